"""Adapters from three Hugging Face dataset schemas to mogrpo's `LabelledResponse` rows.

Each adapter reads one source row, checks it, and returns labelled rows with one label per
requested aspect; an aspect the source says nothing about is NaN (masked downstream, never
read as zero). The mappings:

PKU-Alignment/PKU-SafeRLHF (`pku-saferlhf`)
    Columns: prompt, response_0, response_1, is_response_{0,1}_safe (bool),
    response_{0,1}_severity_level (int 0-3), response_{0,1}_harm_category (str -> bool),
    better_response_id, safer_response_id (0 or 1), and *_source strings.
    Every source row gives two labelled rows, one per response:

        safety = 1 - severity_level / 3    when the severity level is present (not null)
        safety = float(is_safe)            when it is absent or null

    The severity level wins whenever it is present, also when it disagrees with is_safe
    (is_safe true with severity 2 gives 1/3; is_safe false with severity 0 gives 1.0):
    it is the finer-grained of the two annotations. Both raw values are kept in `meta`.
    actionability, politeness and meaningfulness are NaN.
    Preference pairs (`saferlhf_pairs`, `load_hf_pairs`) use better_response_id
    (helpfulness preference): chosen = response_<better>, rejected = the other one; rows
    whose two responses are identical are skipped and counted.

nvidia/HelpSteer2 (`helpsteer2`)
    Columns: prompt, response, helpfulness, correctness, coherence, complexity,
    verbosity, each an integer 0-4.

        actionability  = helpfulness / 4
        meaningfulness = (correctness + coherence) / 8

    safety and politeness are NaN. complexity and verbosity are checked and kept in
    `meta["ratings"]` but not mapped to an aspect.

PKU-Alignment/BeaverTails (`beavertails`)
    Columns: prompt, response, category (14 harm categories, str -> bool), is_safe (bool).

        safety = 1.0 if is_safe else 0.0

    actionability, politeness and meaningfulness are NaN. The categories flagged true are
    kept in `meta["harm_categories"]`. (BeaverTails' splits are named e.g. "330k_train".)

Validation is strict: a missing column, a value of the wrong type or out of range raises
`DataError` naming the row, as 'file.jsonl:17' for local JSONL files (physical line) or
'PKU-Alignment/PKU-SafeRLHF[train]:row 17' for hub datasets (0-based row index).

Sources are either a local `.jsonl` file (one source row per line, same columns as on the
hub) or a hub id, which needs the optional `datasets` package (`pip install datasets`; in a clone
of mogrpo, `pip install -e '.[hf]'`).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from mogrpo.data.loaders import LoadReport, iter_jsonl
from mogrpo.data.schema import DEFAULT_ASPECTS, DataError, LabelledResponse

SAFERLHF_ID = "PKU-Alignment/PKU-SafeRLHF"
HELPSTEER2_ID = "nvidia/HelpSteer2"
BEAVERTAILS_ID = "PKU-Alignment/BeaverTails"

_LOCAL_SUFFIXES = (".jsonl", ".ndjson")
# Suffixes that mark a source as a local file even when it does not exist (so a typo in a
# file name gives "no such file", not a failed hub download).
_FILE_LIKE_SUFFIXES = _LOCAL_SUFFIXES + (".json", ".csv", ".parquet", ".arrow", ".tsv")

Adapter = Callable[[Mapping[str, Any], str, tuple[str, ...]], list[LabelledResponse]]


# --------------------------------------------------------------------------- checks


def _require(row: Mapping[str, Any], column: str, where: str) -> Any:
    if column not in row:
        raise DataError(f"{where}: missing column '{column}' (columns present: "
                        f"{', '.join(sorted(map(str, row))) or 'none'})")
    return row[column]


def _as_row(row: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with named columns, got {type(row).__name__}")
    return row


def _text(row: Mapping[str, Any], column: str, where: str, *, allow_empty: bool = False) -> str:
    value = _require(row, column, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: column '{column}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: column '{column}' is empty")
    return value


def _flag(row: Mapping[str, Any], column: str, where: str) -> bool:
    value = _require(row, column, where)
    if not isinstance(value, bool):
        raise DataError(f"{where}: column '{column}' must be true or false, "
                        f"got {type(value).__name__} {value!r}")
    return value


def _int_in(value: Any, column: str, lo: int, hi: int, where: str) -> int:
    """An integer in [lo, hi]; integral floats (3.0) are accepted, bools and strings are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: column '{column}' must be an integer {lo}-{hi}, "
                        f"got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise DataError(f"{where}: column '{column}' must be an integer {lo}-{hi}, got {value!r}")
    if not lo <= value <= hi:
        raise DataError(f"{where}: column '{column}' = {value!r} is outside {lo}-{hi}")
    return int(value)


def _categories(row: Mapping[str, Any], column: str, where: str) -> list[str]:
    """Names of the harm categories flagged true; the column may be absent or null."""
    value = row.get(column)
    if value is None:
        return []
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, bool) for k, v in value.items()
    ):
        raise DataError(f"{where}: column '{column}' must map category names to true/false")
    return sorted(k for k, v in value.items() if v)


def _select(labels: Mapping[str, float], aspects: tuple[str, ...]) -> dict[str, float]:
    """Exactly the requested aspects; those the source does not label are NaN."""
    return {a: float(labels.get(a, math.nan)) for a in aspects}


# --------------------------------------------------------------------------- adapters


def saferlhf_safety(is_safe: bool, severity_level: int | None) -> float:
    """PKU-SafeRLHF safety label: 1 - severity/3 when severity is known, else float(is_safe)."""
    if severity_level is None:
        return float(is_safe)
    return 1.0 - severity_level / 3.0


def saferlhf_to_labelled(row: Mapping[str, Any], where: str,
                         aspects: tuple[str, ...] = DEFAULT_ASPECTS) -> list[LabelledResponse]:
    """One PKU-SafeRLHF row -> two labelled rows (response_0, response_1); see module docstring."""
    row = _as_row(row, where)
    prompt = _text(row, "prompt", where)
    for column in ("better_response_id", "safer_response_id"):
        if row.get(column) is not None:
            _int_in(row[column], column, 0, 1, where)
    out = []
    for i in (0, 1):
        response = _text(row, f"response_{i}", where, allow_empty=True)
        is_safe = _flag(row, f"is_response_{i}_safe", where)
        severity_col = f"response_{i}_severity_level"
        severity = row.get(severity_col)
        if severity is not None:
            severity = _int_in(severity, severity_col, 0, 3, where)
        harms = _categories(row, f"response_{i}_harm_category", where)
        labels = {"safety": saferlhf_safety(is_safe, severity)}
        meta = {"origin": where, "response_index": i, "is_safe": is_safe,
                "severity_level": severity, "harm_categories": harms}
        out.append(LabelledResponse(prompt=prompt, response=response,
                                    labels=_select(labels, aspects), source=SAFERLHF_ID, meta=meta))
    return out


HELPSTEER2_RATINGS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def helpsteer2_to_labelled(row: Mapping[str, Any], where: str,
                           aspects: tuple[str, ...] = DEFAULT_ASPECTS) -> list[LabelledResponse]:
    """One HelpSteer2 row -> one labelled row (actionability, meaningfulness); see module
    docstring."""
    row = _as_row(row, where)
    prompt = _text(row, "prompt", where)
    response = _text(row, "response", where, allow_empty=True)
    ratings = {name: _int_in(_require(row, name, where), name, 0, 4, where)
               for name in HELPSTEER2_RATINGS}
    labels = {
        "actionability": ratings["helpfulness"] / 4.0,
        "meaningfulness": (ratings["correctness"] + ratings["coherence"]) / 8.0,
    }
    return [LabelledResponse(prompt=prompt, response=response, labels=_select(labels, aspects),
                             source=HELPSTEER2_ID, meta={"origin": where, "ratings": ratings})]


def beavertails_to_labelled(row: Mapping[str, Any], where: str,
                            aspects: tuple[str, ...] = DEFAULT_ASPECTS) -> list[LabelledResponse]:
    """One BeaverTails row -> one labelled row (safety); see module docstring."""
    row = _as_row(row, where)
    prompt = _text(row, "prompt", where)
    response = _text(row, "response", where, allow_empty=True)
    is_safe = _flag(row, "is_safe", where)
    harms = _categories(row, "category", where)
    labels = {"safety": 1.0 if is_safe else 0.0}
    return [LabelledResponse(prompt=prompt, response=response, labels=_select(labels, aspects),
                             source=BEAVERTAILS_ID,
                             meta={"origin": where, "harm_categories": harms})]


@dataclass(frozen=True)
class HFAdapter:
    name: str
    hub_id: str
    to_labelled: Adapter


ADAPTERS: dict[str, HFAdapter] = {
    a.name: a for a in (
        HFAdapter("pku-saferlhf", SAFERLHF_ID, saferlhf_to_labelled),
        HFAdapter("helpsteer2", HELPSTEER2_ID, helpsteer2_to_labelled),
        HFAdapter("beavertails", BEAVERTAILS_ID, beavertails_to_labelled),
    )
}


def get_adapter(name: str) -> HFAdapter:
    """Look an adapter up by short name or hub id (case-insensitive)."""
    key = name.strip().lower()
    for adapter in ADAPTERS.values():
        if key in (adapter.name, adapter.hub_id.lower()):
            return adapter
    names = [n for a in ADAPTERS.values() for n in (a.name, a.hub_id)]
    raise ValueError(f"unknown Hugging Face adapter {name!r}; choose one of {', '.join(names)}")


# --------------------------------------------------------------------------- sources


def _is_local(source: str | os.PathLike) -> bool:
    if not isinstance(source, str):
        return True
    path = Path(source)
    return path.suffix.lower() in _FILE_LIKE_SUFFIXES or path.is_file()


def _import_datasets() -> Any:
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only for hub sources
    except ImportError as exc:
        raise ImportError("loading a dataset from the Hugging Face hub needs the `datasets` "
                          "package: pip install datasets (in a clone of mogrpo: pip install -e "
                          "'.[hf]'), or pass a local .jsonl file with the same columns") from exc
    return datasets


def iter_hf_rows(source: str | os.PathLike, split: str = "train",
                 limit: int | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) from a local JSONL file or a hub dataset, at most `limit` rows."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if _is_local(source):
        path = Path(source)
        if path.suffix.lower() not in _LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; export the rows "
                            "as .jsonl (one object per line, hub column names)")
        rows: Iterator[tuple[str, Any]] = iter_jsonl(path)
    else:
        datasets = _import_datasets()
        dataset = datasets.load_dataset(source, split=split)
        rows = ((f"{source}[{split}]:row {i}", row) for i, row in enumerate(dataset))
    return itertools.islice(rows, limit) if limit is not None else rows


def load_hf_labelled(adapter_name: str, source: str | os.PathLike, split: str = "train",
                     aspects: tuple[str, ...] | list[str] = DEFAULT_ASPECTS,
                     report: LoadReport | None = None,
                     limit: int | None = None) -> list[LabelledResponse]:
    """Labelled rows from a Hugging Face schema, read from a local .jsonl file or a hub id.

    `adapter_name` is "pku-saferlhf", "helpsteer2" or "beavertails" (or the hub id);
    `limit` caps the source rows read. Each returned row's labels hold exactly `aspects`.
    Labelled rows with no label for any requested aspect are skipped and counted in
    `report`; `report.read` counts labelled rows produced (two per PKU-SafeRLHF row), so
    read = kept + skipped.
    """
    adapter = get_adapter(adapter_name)
    aspects = tuple(aspects)
    if not aspects:
        raise ValueError("aspects is empty; ask for at least one aspect")
    report = report if report is not None else LoadReport()
    out: list[LabelledResponse] = []
    for where, row in iter_hf_rows(source, split, limit):
        for rec in adapter.to_labelled(row, where, aspects):
            report.read += 1
            if rec.n_labels() == 0:
                report.skip(f"no label for any of {', '.join(aspects)}")
                continue
            out.append(rec)
            report.kept += 1
    return out


# --------------------------------------------------------------------------- pairs


def saferlhf_pairs(rows: Iterable[Mapping[str, Any]] | Iterable[tuple[str, Mapping[str, Any]]],
                   report: LoadReport | None = None) -> Iterator[dict[str, str]]:
    """Yield {"prompt", "chosen", "rejected"} from PKU-SafeRLHF rows by better_response_id.

    `rows` holds plain row dicts or (where, row) tuples as given by `iter_hf_rows`.
    Rows whose two responses are identical (after stripping whitespace) carry no
    preference and are skipped, counted in `report` under "identical responses".
    """
    report = report if report is not None else LoadReport()
    for index, item in enumerate(rows):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            where, row = item
        else:
            where, row = f"row {index}", item
        row = _as_row(row, where)
        report.read += 1
        prompt = _text(row, "prompt", where)
        responses = [_text(row, f"response_{i}", where, allow_empty=True) for i in (0, 1)]
        better = _int_in(_require(row, "better_response_id", where), "better_response_id", 0, 1,
                         where)
        if responses[0].strip() == responses[1].strip():
            report.skip("identical responses")
            continue
        report.kept += 1
        yield {"prompt": prompt, "chosen": responses[better], "rejected": responses[1 - better]}


def load_hf_pairs(source: str | os.PathLike, split: str = "train", limit: int | None = None,
                  report: LoadReport | None = None) -> list[dict[str, str]]:
    """PKU-SafeRLHF preference pairs from a local .jsonl file or the hub; see `saferlhf_pairs`."""
    return list(saferlhf_pairs(iter_hf_rows(source, split, limit), report=report))
