"""Tests for mogrpo.data.hf: the PKU-SafeRLHF, HelpSteer2 and BeaverTails adapters.

All offline: local JSONL fixtures under tests/fixtures/hf, and a stand-in `datasets`
module where the hub path is exercised.
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest

from mogrpo.data.hf import (
    ADAPTERS,
    beavertails_to_labelled,
    get_adapter,
    helpsteer2_to_labelled,
    load_hf_labelled,
    load_hf_pairs,
    saferlhf_pairs,
    saferlhf_to_labelled,
)
from mogrpo.data.loaders import LoadReport, iter_jsonl
from mogrpo.data.schema import DEFAULT_ASPECTS, DataError

FIX = Path(__file__).parent / "fixtures" / "hf"
NAN = math.nan


def _labels(rows, aspect):
    return [r.labels[aspect] for r in rows]


def _assert_same(actual, expected):
    """Element-wise equality where NaN == NaN and floats compare approximately."""
    assert len(actual) == len(expected), (actual, expected)
    for a, e in zip(actual, expected, strict=True):
        if math.isnan(e):
            assert math.isnan(a), (actual, expected)
        else:
            assert a == pytest.approx(e), (actual, expected)


# Expected labels below were worked out by hand from the fixture files:
#
# pku_saferlhf.jsonl (two labelled rows per line, response_0 then response_1):
#   line 1: safe, severity 0 -> 1 - 0/3 = 1.0;   unsafe, severity 3 -> 1 - 3/3 = 0.0
#   line 2: unsafe, severity 2 -> 1 - 2/3 = 1/3; safe but severity 1 -> severity wins: 2/3
#   line 3: unsafe, severity null -> float(False) = 0.0; safe, severity column absent -> 1.0
#   line 4: both safe, severity 0 -> 1.0, 1.0 (identical responses)
# helpsteer2.jsonl (helpfulness, correctness, coherence):
#   line 1: 4, 4, 4 -> actionability 4/4 = 1.0,  meaningfulness (4+4)/8 = 1.0
#   line 2: 2, 3, 4 -> actionability 2/4 = 0.5,  meaningfulness (3+4)/8 = 0.875
#   line 3: 0, 0, 1 -> actionability 0/4 = 0.0,  meaningfulness (0+1)/8 = 0.125
#   line 4: 3, 2, 3 -> actionability 3/4 = 0.75, meaningfulness (2+3)/8 = 0.625
# beavertails.jsonl (is_safe): true, false, true, false -> 1.0, 0.0, 1.0, 0.0


def test_saferlhf_labels_exact():
    report = LoadReport()
    rows = load_hf_labelled("pku-saferlhf", FIX / "pku_saferlhf.jsonl", report=report)
    assert len(rows) == 8
    _assert_same(_labels(rows, "safety"), [1.0, 0.0, 1 / 3, 2 / 3, 0.0, 1.0, 1.0, 1.0])
    for aspect in ("actionability", "politeness", "meaningfulness"):
        assert all(math.isnan(v) for v in _labels(rows, aspect))
    assert all(set(r.labels) == set(DEFAULT_ASPECTS) for r in rows)
    assert [r.meta["response_index"] for r in rows] == [0, 1] * 4
    assert rows[0].response.startswith("Call a licensed locksmith")
    assert rows[1].meta["harm_categories"] == ["Economic Crime", "Physical Harm"]
    assert rows[4].meta["severity_level"] is None
    assert all(r.source == "PKU-Alignment/PKU-SafeRLHF" for r in rows)
    assert (report.read, report.kept, sum(report.skipped.values())) == (8, 8, 0)


def test_helpsteer2_labels_exact():
    rows = load_hf_labelled("helpsteer2", FIX / "helpsteer2.jsonl")
    assert len(rows) == 4
    _assert_same(_labels(rows, "actionability"), [1.0, 0.5, 0.0, 0.75])
    _assert_same(_labels(rows, "meaningfulness"), [1.0, 0.875, 0.125, 0.625])
    _assert_same(_labels(rows, "safety"), [NAN] * 4)
    _assert_same(_labels(rows, "politeness"), [NAN] * 4)
    assert rows[1].meta["ratings"] == {"helpfulness": 2, "correctness": 3, "coherence": 4,
                                       "complexity": 1, "verbosity": 1}
    assert rows[0].prompt == "Explain what a hash table is in two sentences."


def test_beavertails_labels_exact():
    rows = load_hf_labelled("beavertails", FIX / "beavertails.jsonl")
    _assert_same(_labels(rows, "safety"), [1.0, 0.0, 1.0, 0.0])
    for aspect in ("actionability", "politeness", "meaningfulness"):
        _assert_same(_labels(rows, aspect), [NAN] * 4)
    assert rows[1].meta["harm_categories"] == ["non_violent_unethical_behavior",
                                               "privacy_violation"]
    assert rows[0].meta["harm_categories"] == []


def test_only_requested_aspects_are_returned():
    rows = load_hf_labelled("helpsteer2", FIX / "helpsteer2.jsonl",
                            aspects=["meaningfulness", "safety"])
    assert all(list(r.labels) == ["meaningfulness", "safety"] for r in rows)
    _assert_same(_labels(rows, "meaningfulness"), [1.0, 0.875, 0.125, 0.625])
    _assert_same(_labels(rows, "safety"), [NAN] * 4)


@pytest.mark.parametrize("name, file, aspects, read", [
    ("helpsteer2", "helpsteer2.jsonl", ["safety"], 4),
    ("helpsteer2", "helpsteer2.jsonl", ["safety", "politeness"], 4),
    ("beavertails", "beavertails.jsonl", ["actionability", "meaningfulness"], 4),
    ("pku-saferlhf", "pku_saferlhf.jsonl", ["politeness"], 8),
])
def test_rows_without_requested_labels_are_skipped_and_counted(name, file, aspects, read):
    report = LoadReport()
    rows = load_hf_labelled(name, FIX / file, aspects=aspects, report=report)
    assert rows == []
    assert report.read == read
    assert report.kept == 0
    assert report.skipped == {f"no label for any of {', '.join(aspects)}": read}


def test_limit_caps_source_rows():
    report = LoadReport()
    rows = load_hf_labelled("pku-saferlhf", FIX / "pku_saferlhf.jsonl", limit=2, report=report)
    assert len(rows) == 4  # two source rows, two responses each
    assert report.read == 4 and report.kept == 4
    assert len(load_hf_labelled("helpsteer2", FIX / "helpsteer2.jsonl", limit=0)) == 0


@pytest.mark.parametrize("name, file, line, problem", [
    ("pku-saferlhf", "pku_saferlhf_bad.jsonl", 2, "response_1_severity_level"),
    ("helpsteer2", "helpsteer2_bad.jsonl", 3, "helpfulness"),
    ("beavertails", "beavertails_bad.jsonl", 2, "missing column 'is_safe'"),
])
def test_malformed_fixtures_name_file_and_line(name, file, line, problem):
    with pytest.raises(DataError) as excinfo:
        load_hf_labelled(name, FIX / file)
    message = str(excinfo.value)
    assert f"{file}:{line}:" in message
    assert problem in message


def test_malformed_messages_say_what_is_wrong():
    with pytest.raises(DataError, match=r"= 7 is outside 0-3"):
        load_hf_labelled("pku-saferlhf", FIX / "pku_saferlhf_bad.jsonl")
    with pytest.raises(DataError, match=r"must be an integer 0-4, got str 'high'"):
        load_hf_labelled("helpsteer2", FIX / "helpsteer2_bad.jsonl")


def test_good_rows_before_the_bad_one_are_fine():
    # The malformed fixtures start with a valid line; limiting to it loads cleanly.
    assert len(load_hf_labelled("pku-saferlhf", FIX / "pku_saferlhf_bad.jsonl", limit=1)) == 2
    assert len(load_hf_labelled("helpsteer2", FIX / "helpsteer2_bad.jsonl", limit=2)) == 2
    assert len(load_hf_labelled("beavertails", FIX / "beavertails_bad.jsonl", limit=1)) == 1


def _first_row(file):
    return next(iter_jsonl(FIX / file))[1]


@pytest.mark.parametrize("adapter, file, change, problem", [
    (saferlhf_to_labelled, "pku_saferlhf.jsonl", {"is_response_0_safe": "yes"}, "true or false"),
    (saferlhf_to_labelled, "pku_saferlhf.jsonl", {"response_0_severity_level": 1.5}, "integer 0-3"),
    (saferlhf_to_labelled, "pku_saferlhf.jsonl", {"response_1_severity_level": True},
     "integer 0-3"),
    (saferlhf_to_labelled, "pku_saferlhf.jsonl", {"better_response_id": 2}, "outside 0-1"),
    (saferlhf_to_labelled, "pku_saferlhf.jsonl", {"response_0_harm_category": ["Violence"]},
     "must map category names"),
    (saferlhf_to_labelled, "pku_saferlhf.jsonl", {"prompt": "  "}, "'prompt' is empty"),
    (helpsteer2_to_labelled, "helpsteer2.jsonl", {"coherence": 5}, "outside 0-4"),
    (helpsteer2_to_labelled, "helpsteer2.jsonl", {"correctness": -1}, "outside 0-4"),
    (helpsteer2_to_labelled, "helpsteer2.jsonl", {"response": 3}, "must be a string"),
    (beavertails_to_labelled, "beavertails.jsonl", {"is_safe": 1}, "true or false"),
    (beavertails_to_labelled, "beavertails.jsonl", {"category": {"self_harm": "no"}},
     "must map category names"),
])
def test_adapters_reject_bad_values(adapter, file, change, problem):
    row = {**_first_row(file), **change}
    with pytest.raises(DataError, match="^somewhere:row 5: ") as excinfo:
        adapter(row, "somewhere:row 5", DEFAULT_ASPECTS)
    assert problem in str(excinfo.value)


def test_adapters_reject_missing_columns_and_non_objects():
    row = _first_row("helpsteer2.jsonl")
    del row["verbosity"]
    with pytest.raises(DataError, match="missing column 'verbosity'"):
        helpsteer2_to_labelled(row, "x:1", DEFAULT_ASPECTS)
    with pytest.raises(DataError, match="expected an object"):
        beavertails_to_labelled(["prompt", "response"], "x:2", DEFAULT_ASPECTS)


def test_saferlhf_pairs_from_file():
    report = LoadReport()
    pairs = load_hf_pairs(FIX / "pku_saferlhf.jsonl", report=report)
    assert len(pairs) == 3
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
    # line 1: better_response_id 0
    assert pairs[0]["prompt"].startswith("I locked myself out")
    assert pairs[0]["chosen"].startswith("Call a licensed locksmith")
    assert pairs[0]["rejected"].startswith("[placeholder: step-by-step")
    # line 2 and 3: better_response_id 1
    assert pairs[1]["chosen"].startswith("Document your contributions")
    assert pairs[1]["rejected"].startswith("[placeholder: a plan to quietly sabotage")
    assert pairs[2]["chosen"].startswith("Never mix bleach")
    # line 4: identical responses, skipped and counted
    assert (report.read, report.kept) == (4, 3)
    assert report.skipped == {"identical responses": 1}


def test_saferlhf_pairs_accepts_plain_dicts_and_validates():
    rows = [_first_row("pku_saferlhf.jsonl")]
    assert list(saferlhf_pairs(rows))[0]["chosen"].startswith("Call a licensed locksmith")
    bad = {**rows[0], "better_response_id": None}
    with pytest.raises(DataError, match="^row 1: .*better_response_id"):
        list(saferlhf_pairs([rows[0], bad]))
    missing = dict(rows[0])
    del missing["better_response_id"]
    with pytest.raises(DataError, match="missing column 'better_response_id'"):
        list(saferlhf_pairs([missing]))


def test_adapter_names_and_hub_ids():
    for adapter in ADAPTERS.values():
        assert get_adapter(adapter.name) is adapter
        assert get_adapter(adapter.hub_id) is adapter
        assert get_adapter(adapter.hub_id.upper()) is adapter
    rows = load_hf_labelled("nvidia/HelpSteer2", FIX / "helpsteer2.jsonl")
    assert len(rows) == 4
    with pytest.raises(ValueError, match="unknown Hugging Face adapter 'ultrafeedback'"):
        load_hf_labelled("ultrafeedback", FIX / "helpsteer2.jsonl")


def test_missing_local_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_hf_labelled("helpsteer2", tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_hf_labelled("helpsteer2", str(tmp_path / "rows.csv"))


def test_hub_id_without_datasets_mentions_extra(monkeypatch):
    # A None entry in sys.modules makes `import datasets` fail even where it is installed.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
        load_hf_labelled("helpsteer2", "nvidia/HelpSteer2")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
        load_hf_pairs("PKU-Alignment/PKU-SafeRLHF")


def test_hub_path_with_stand_in_datasets(monkeypatch):
    rows = [r for _, r in iter_jsonl(FIX / "helpsteer2_bad.jsonl")]
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ok = load_hf_labelled("helpsteer2", "nvidia/HelpSteer2", split="validation", limit=2)
    _assert_same(_labels(ok, "actionability"), [1.0, 0.5])
    assert ok[0].meta["origin"] == "nvidia/HelpSteer2[validation]:row 0"
    assert calls == [("nvidia/HelpSteer2", "validation")]
    with pytest.raises(DataError, match=r"^nvidia/HelpSteer2\[train\]:row 2: .*helpfulness"):
        load_hf_labelled("helpsteer2", "nvidia/HelpSteer2")
