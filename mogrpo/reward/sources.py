"""Where reward columns come from, mixed in one objective (reward/scoring.py's `Scorer`).

A reward source turns N (prompt, completion) pairs into a float matrix [N, k] of k named
columns, NaN = "not applicable" (masked downstream like a missing aspect):
- `MultiAspectSource`: mogrpo's multi-aspect reward model (`mogrpo reward train`), one
  forward giving its K aspects;
- `HFRewardModel`: a Hugging Face sequence-classification reward model (hub id, folder or a
  loaded model), scored through its own tokenizer and chat template; one head gives the
  column `name`, several give `name_<label>` each;
- `PythonReward`: a function with TRL's signature `f(prompts, completions, **columns) ->
  list[float | None]`, None meaning not applicable.

In YAML, `rewards:` is a list of specs (`build_sources`); in Python, the objects themselves
or anything `as_source` understands (a function, a model, a folder). Shapes: N pairs, k
columns of one source.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import Any, Callable

import torch

from mogrpo.tracking import DivergedError

SOURCE_TYPES = ("multi_aspect", "hf", "python", "builtin")
DEFAULT_REWARD_MODEL = "runs/reward-default/model"  # where the standalone commands put it

RewardFn = Callable[[list[str], list[str]], list]


def _politeness_judge(cache=None) -> RewardFn:
    from mogrpo.reward.judges import ToxicityJudge

    judge = ToxicityJudge.from_cache(cache)
    return lambda prompts, completions: judge.politeness(completions).tolist()


def _length_ratio(prompts, completions):
    """1 - words / 200, floored at 0: a mild push towards concise answers."""
    return [max(0.0, 1.0 - len(c.split()) / 200.0) for c in completions]


def extra_reward(name: str, cache=None) -> RewardFn:
    """Built-in extra reward columns, by config name."""
    if name == "judge_politeness":
        return _politeness_judge(cache)
    if name == "concise":
        return _length_ratio
    raise ValueError(f"unknown extra reward {name!r}; built-ins: judge_politeness, concise "
                     "(or pass callables to Scorer directly)")


class MultiAspectSource:
    """mogrpo's multi-aspect reward model: its aspects are the columns."""

    def __init__(self, rm, batch_size: int = 64):
        self.rm, self.batch_size = rm, batch_size
        self.columns = list(rm.aspects)

    def spec(self) -> dict:
        return {"type": "multi_aspect", "path": str(getattr(self.rm, "folder", "") or "")}

    def to(self, device) -> None:
        self.rm.to(device)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **_) -> torch.Tensor:
        scores = self.rm.score(prompts, completions, batch_size=self.batch_size).float().clone()
        if not bool(torch.isfinite(scores).all()):  # the model's NaN is not "not applicable"
            raise DivergedError(f"the reward model scored NaN or inf (aspects {self.columns})")
        return scores  # [N, K]


class HFRewardModel:
    """A Hugging Face `AutoModelForSequenceClassification` reward model. The pair is rendered
    with the reward model's own chat template (the whole conversation, then the completion as
    the assistant turn) when its tokenizer has one, else as 'prompt\\n\\ncompletion'."""

    def __init__(self, model, name: str | None = None, *, tokenizer=None, device=None,
                 batch_size: int = 16, max_length: int = 1024):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.ref = model if isinstance(model, str) else getattr(model, "name_or_path", "")
        if isinstance(model, str):
            try:
                model = AutoModelForSequenceClassification.from_pretrained(model)
            except (OSError, ValueError) as exc:
                raise ValueError(f"reward model {self.ref!r} does not load as a Hugging Face "
                                 f"sequence-classification model ({str(exc).splitlines()[0]}); "
                                 f"give a hub id (online) or a folder with config.json and "
                                 f"weights") from None
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(self.ref)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        if device is not None:
            self.model.to(device)
        self.name = name or Path(self.ref.rstrip("/")).name or "hf_reward"
        n = model.config.num_labels
        labels = getattr(model.config, "id2label", None) or {}
        self.columns = ([self.name] if n == 1 else
                        [f"{self.name}_{labels.get(i, i)}" for i in range(n)])
        for p in self.model.parameters():
            p.requires_grad_(False)

    def spec(self) -> dict:
        return {"type": "hf", "model": self.ref, "name": self.name}

    def to(self, device) -> None:
        self.model.to(device)

    def texts(self, chats: list, completions: list[str]) -> list[str]:
        from mogrpo.rollout import as_messages, prompt_text

        if getattr(self.tok, "chat_template", None):
            return [self.tok.apply_chat_template(
                as_messages(p) + [{"role": "assistant", "content": c}], tokenize=False)
                for p, c in zip(chats, completions)]
        return [f"{prompt_text(p)}\n\n{c}" for p, c in zip(chats, completions)]

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], *, chats: list | None = None,
                 **_) -> torch.Tensor:
        texts = self.texts(chats if chats is not None else prompts, completions)
        device = next(self.model.parameters()).device
        out = torch.empty(len(texts), len(self.columns))
        for s in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[s:s + self.batch_size], return_tensors="pt", padding=True,
                           truncation=True, max_length=self.max_length,
                           add_special_tokens=not getattr(self.tok, "chat_template", None))
            out[s:s + self.batch_size] = self.model(**enc.to(device)).logits.float().cpu()
        if not bool(torch.isfinite(out).all()):
            raise DivergedError(f"the reward model {self.ref!r} scored NaN or inf")
        return out  # [N, k]


def conversational(chats: list) -> bool:
    return any(not isinstance(c, str) for c in chats)


class PythonReward:
    """A reward function with TRL's signature, `fn(prompts, completions, **columns)`: called
    with keyword arguments `prompts`, `completions` and one list per other column of the
    prompts' rows (at least `kind`), each of length N. With conversational prompts, as in
    TRL, `prompts` are message lists and each completion is [{"role": "assistant",
    "content": text}]. Returns N numbers; None (or NaN) = not applicable."""

    def __init__(self, fn: Callable, name: str | None = None, ref: str | None = None, *,
                 plain: bool = False):
        """`plain`: always pass prompts and completions as strings (mogrpo's built-ins)."""
        if not callable(fn):
            raise TypeError(f"a reward function must be callable, got {type(fn).__name__}")
        self.fn, self.name = fn, name or getattr(fn, "__name__", "reward")
        self.ref = ref or function_ref(fn)
        self.columns, self.plain = [self.name], plain

    def spec(self) -> dict:
        if self.plain and self.ref is None:
            return {"type": "builtin", "name": self.name}
        return {"type": "python", "ref": self.ref, "name": self.name}

    def __call__(self, prompts: list[str], completions: list[str], *, chats: list | None = None,
                 columns: dict[str, list] | None = None, **_) -> torch.Tensor:
        if chats is not None and not self.plain and conversational(chats):
            from mogrpo.rollout import as_messages

            prompts = [as_messages(c) for c in chats]
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        values = self.fn(prompts=prompts, completions=completions, **(columns or {}))
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        values = list(values)
        if len(values) != len(completions):
            raise ValueError(f"reward function {self.name!r} returned {len(values)} values for "
                             f"{len(completions)} completions: return one number (or None) each")
        try:
            col = torch.tensor([math.nan if v is None else float(v) for v in values])
        except (TypeError, ValueError):
            raise ValueError(f"reward function {self.name!r} returned a value that is not a "
                             f"number or None: {values[:4]}") from None
        if bool(torch.isinf(col).any()):  # None / NaN = not applicable; inf is a broken reward
            raise DivergedError(f"reward function {self.name!r} returned inf for completion "
                                f"{int(torch.isinf(col).nonzero()[0])}")
        return col[:, None]  # [N, 1]


def plain_reward(name: str, fn: RewardFn) -> PythonReward:
    """A mogrpo-style function `fn(prompts, completions)` (the built-ins, `extra` columns) as
    a source: strings in, whatever the prompts' form, and no other columns."""
    return PythonReward(lambda prompts, completions, _f=fn, **_: _f(prompts, completions), name,
                        plain=True)


def function_ref(fn) -> str | None:
    """How config.yaml names a function so that `mogrpo eval` on the run can rebuild the
    objective: 'package.module:qualname' for a function in a package, 'path/to/file.py:name'
    for one in a top-level module (often a file beside the user's script, importable only
    from there; the path is relative to the working directory when it lies below it), None
    for a lambda, a nested function or one defined in __main__."""
    import inspect

    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qual:
        return None
    if "." in module:
        return f"{module}:{qual}"
    try:
        path = Path(inspect.getsourcefile(fn) or "").resolve()
    except TypeError:
        return f"{module}:{qual}"
    if not path.is_file():
        return f"{module}:{qual}"
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return f"{path}:{qual}"


def load_function(ref: str) -> Callable:
    """'package.module:function' or 'path/to/file.py:function' -> the function."""
    if ":" not in ref:
        raise ValueError(f"python reward ref {ref!r}: use 'module:function' or "
                         f"'path/to/file.py:function'")
    where, name = ref.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except (ImportError, FileNotFoundError) as exc:
        raise ValueError(f"python reward ref {ref!r}: cannot import {where!r} ({exc}); check the "
                         f"module is on PYTHONPATH or give a file path") from None
    fn = module
    for part in name.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"python reward ref {ref!r}: {where!r} has no function {name!r}")
    return fn


SPEC_KEYS = {"multi_aspect": {"path"}, "hf": {"model"}, "python": {"ref"}, "builtin": {"name"}}


def config_specs(rewards: list[dict] | None, reward_model: str,
                 extra: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """The reward specs of a run's config: its `rewards`, else the multi-aspect reward model at
    `reward_model`; then a built-in spec per `extra` column (GRPO's extra_rewards)."""
    specs = list(rewards) if rewards is not None else [{"type": "multi_aspect",
                                                        "path": reward_model}]
    return specs + [{"type": "builtin", "name": n} for n in extra]


def place_sources(sources: list, device, amp) -> list:
    """The model sources moved to `device`; a multi-aspect model scores under `amp` (its
    autocast dtype, None = off). Returns `sources`."""
    for src in sources:
        if hasattr(src, "to"):
            src.to(device)
        if hasattr(src, "rm"):
            src.rm.autocast_dtype = amp
    return sources


def check_specs(specs) -> None:
    """A `rewards:` list's shape, checked when the config loads (nothing is loaded yet)."""
    if not isinstance(specs, list):  # [] = no reward (DPO on given pairs needs none)
        raise ValueError(f"rewards = {specs!r}: give a list, e.g. [{{type: multi_aspect, "
                         f"path: runs/reward-default/model}}]")
    for i, spec in enumerate(specs):
        where = f"rewards[{i}]"
        if not isinstance(spec, dict) or spec.get("type") not in SOURCE_TYPES:
            raise ValueError(f"{where} = {spec!r}: each reward is a mapping with type one of "
                             f"{SOURCE_TYPES}, e.g. {{type: python, ref: 'module:function'}}")
        kind = spec["type"]
        # a python reward given as an object has no ref: recorded, not rebuildable
        need = SPEC_KEYS[kind] - ({"ref"} if kind == "python" and "name" in spec else set())
        allowed = SPEC_KEYS[kind] | {"type", "name", "batch_size"}
        missing, unknown = sorted(need - set(spec)), sorted(set(spec) - allowed)
        if missing or unknown:
            raise ValueError(f"{where}: a {kind} reward takes {sorted(allowed)}; missing "
                             f"{missing}, unknown {unknown}")


def build_sources(specs: list[dict], *, cache_dir=None, device=None) -> list:
    """The sources a config's `rewards:` list names, e.g.
    [{type: multi_aspect, path: runs/reward-default/model}, {type: hf, model: ID, name: helpful},
    {type: python, ref: "my_rewards:length_ok"}, {type: builtin, name: concise}]."""
    from mogrpo.reward.model import MultiAspectRewardModel, require_reward_model

    check_specs(specs)
    out = []
    for i, spec in enumerate(specs):
        kind = spec["type"]
        if kind == "python" and spec.get("ref") is None:
            raise ValueError(f"rewards[{i}]: the python reward {spec.get('name')!r} was given as "
                             f"an object (no importable ref): pass the function again, or give "
                             f"ref: 'module:function'")
        if kind == "multi_aspect":
            rm = MultiAspectRewardModel.load(require_reward_model(spec["path"]), device=device)
            rm.folder = spec["path"]
            out.append(MultiAspectSource(rm, spec.get("batch_size", 64)))
        elif kind == "hf":
            out.append(HFRewardModel(spec["model"], spec.get("name"), device=device,
                                     batch_size=spec.get("batch_size", 16)))
        elif kind == "python":
            out.append(PythonReward(load_function(spec["ref"]), spec.get("name"), spec["ref"]))
        else:
            out.append(plain_reward(spec["name"], extra_reward(spec["name"], cache_dir)))
    return out


def as_source(obj: Any, *, device=None):
    """What the Python API accepts as a reward: a source, a function (TRL's reward function),
    a mogrpo reward model (object or folder), a Hugging Face sequence-classification model
    (object, folder or hub id)."""
    from mogrpo.reward.model import MultiAspectRewardModel

    if isinstance(obj, (MultiAspectSource, HFRewardModel, PythonReward)):
        return obj
    if isinstance(obj, MultiAspectRewardModel):
        return MultiAspectSource(obj)
    if isinstance(obj, (str, Path)):
        if (Path(obj) / "reward_config.json").is_file():
            return build_sources([{"type": "multi_aspect", "path": str(obj)}], device=device)[0]
        return HFRewardModel(str(obj), device=device)
    if isinstance(obj, torch.nn.Module):
        return HFRewardModel(obj, device=device)
    if callable(obj):
        return PythonReward(obj)
    raise TypeError(f"a reward must be a function, a reward model or its folder/hub id, got "
                    f"{type(obj).__name__}")


def check_columns(sources: list) -> list[str]:
    """All columns in order; two sources naming one column is an error."""
    cols: list[str] = []
    for s in sources:
        clash = sorted(set(cols) & set(s.columns))
        if clash:
            raise ValueError(f"two rewards give the column(s) {clash}: name them apart "
                             f"(name: ... in the rewards list, or PythonReward(fn, name=...))")
        cols += s.columns
    return cols
