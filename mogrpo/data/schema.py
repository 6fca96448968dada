"""The two record types that flow through mogrpo, and their validation.

- `PromptRecord`: something to ask a policy (id, text or chat messages, kind, source, category).
- `LabelledResponse`: a (prompt, response) pair with one label in [0, 1] per aspect;
  a missing label is NaN and is masked out of every loss and metric, never read as zero.

Validation errors name the file and line (`where`) and say what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ASPECTS: tuple[str, ...] = ("safety", "actionability", "politeness", "meaningfulness")
PROMPT_KINDS: tuple[str, ...] = ("harmful", "benign")


class DataError(ValueError):
    """A data file or row is malformed; the message names the file, the line and the problem."""


@dataclass
class PromptRecord:
    id: str
    text: str  # the user turn as plain text (the last user message when `messages` is given)
    kind: str  # "harmful" | "benign" | "" (a task without kinds: no kind-based metrics)
    source: str
    category: str = ""
    messages: list[dict[str, str]] | None = None  # optional chat history [{"role", "content"}]
    # The bare request when `text` wraps it (an attack template): what the answer is judged
    # against by the compliance judge and the reward model. None = `text` is the request.
    request: str | None = None
    # the row's other columns (a user's dataset): passed to Python reward functions by name
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def chat(self):
        """What the policy is asked: the whole conversation (system message and history
        included) when the record has `messages`, else `text` as one user turn."""
        return self.messages if self.messages is not None else self.text

    @property
    def judged_request(self) -> str:
        return self.request if self.request is not None else self.text

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "text": self.text, "kind": self.kind,
                             "source": self.source, "category": self.category}
        if self.messages is not None:
            d["messages"] = self.messages
        if self.request is not None:
            d["request"] = self.request
        d.update({k: v for k, v in self.columns.items() if k not in d})
        return d


@dataclass
class LabelledResponse:
    prompt: str
    response: str
    labels: dict[str, float]  # aspect -> value in [0, 1], NaN = not labelled
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # free provenance (e.g. "construction")

    def label_vector(self, aspects: tuple[str, ...] | list[str]) -> list[float]:
        return [float(self.labels.get(a, math.nan)) for a in aspects]

    def n_labels(self) -> int:
        return sum(1 for v in self.labels.values() if not math.isnan(v))

    def to_dict(self, aspects: tuple[str, ...] | list[str] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": self.prompt, "response": self.response}
        for a in aspects if aspects is not None else sorted(self.labels):
            v = self.labels.get(a, math.nan)
            d[a] = None if math.isnan(v) else round(float(v), 6)
        d["source"] = self.source
        if self.meta:
            d["meta"] = self.meta
        return d


def _text(value: Any, name: str, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def parse_label(value: Any, aspect: str, where: str) -> float:
    """A label value: a number in [0, 1]; None / '' / 'nan' mean "not labelled" (NaN)."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        s = value.strip()
        if s == "" or s.lower() in ("nan", "null", "none", "na", "n/a"):
            return math.nan
        try:
            value = float(s)
        except ValueError:
            raise DataError(f"{where}: label '{aspect}' = {value!r} is not a number in [0, 1] "
                            f"(leave it empty or null when the row has no such label)") from None
    if not isinstance(value, (int, float)):
        raise DataError(f"{where}: label '{aspect}' must be a number in [0, 1] or null, "
                        f"got {type(value).__name__}")
    v = float(value)
    if math.isnan(v):
        return math.nan
    if not (0.0 <= v <= 1.0):
        raise DataError(f"{where}: label '{aspect}' = {v} is outside [0, 1]; rescale it "
                        f"(e.g. a 1-5 rating r becomes (r - 1) / 4)")
    return v


PROMPT_KEYS = ("id", "text", "prompt", "messages", "kind", "source", "category", "request")


def prompt_from_dict(d: Any, where: str, *, default_source: str = "",
                     default_id: str | None = None) -> PromptRecord:
    """A prompt row: 'text' / 'prompt' (a string or, as in TRL's conversational format, a list
    of messages) or 'messages'; 'kind' optional; every other key is kept in `columns`."""
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
    messages = d.get("messages")
    text = d.get("text", d.get("prompt"))
    if isinstance(text, list) and messages is None:  # a conversational 'prompt'
        messages, text = text, None
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"),
                                                                                  str)
            for m in messages
        ):
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            "{\"role\": ..., \"content\": ...} objects")
        if text is None:
            users = [m["content"] for m in messages if m["role"] == "user"]
            if not users:
                raise DataError(f"{where}: 'messages' has no user turn")
            text = users[-1]
    if text is None:
        raise DataError(f"{where}: a prompt needs 'text' (or 'prompt', or 'messages')")
    text = _text(text, "text", where)
    kind = d.get("kind") or ""
    if kind and kind not in PROMPT_KINDS:
        raise DataError(f"{where}: 'kind' must be one of {list(PROMPT_KINDS)} or left out (a "
                        f"task without kinds), got {kind!r}")
    pid = d.get("id", default_id)
    if pid is None or (isinstance(pid, str) and not pid.strip()):
        raise DataError(f"{where}: a prompt needs a non-empty 'id'")
    source = d.get("source", default_source)
    category = d.get("category", "") or ""
    if not isinstance(source, str) or not isinstance(category, str):
        raise DataError(f"{where}: 'source' and 'category' must be strings")
    request = d.get("request")
    if request is not None:
        request = _text(request, "request", where)
    columns = {k: v for k, v in d.items() if k not in PROMPT_KEYS}
    return PromptRecord(id=str(pid), text=text, kind=kind, source=source, category=category,
                        messages=messages, request=request, columns=columns)


def labelled_from_dict(d: Any, aspects: tuple[str, ...] | list[str], where: str,
                       *, default_source: str = "") -> LabelledResponse:
    """Parse one labelled row. Aspect columns absent from the row are NaN."""
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected an object with 'prompt' and 'response', "
                        f"got {type(d).__name__}")
    for key in ("prompt", "response"):
        if key not in d:
            raise DataError(f"{where}: missing field '{key}' (a labelled row needs 'prompt', "
                            f"'response' and one column per aspect: {', '.join(aspects)})")
    prompt = _text(d["prompt"], "prompt", where)
    response = _text(d["response"], "response", where, allow_empty=True)
    labels = {a: parse_label(d.get(a), a, where) for a in aspects}
    source = d.get("source") or default_source
    if not isinstance(source, str):
        raise DataError(f"{where}: 'source' must be a string")
    meta = d.get("meta") if isinstance(d.get("meta"), dict) else {}
    return LabelledResponse(prompt=prompt, response=response, labels=labels, source=source,
                            meta=meta)
