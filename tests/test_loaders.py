import json
import math

import pytest

from mogrpo.data.loaders import LoadReport, load_labelled, load_prompts
from mogrpo.data.schema import DataError, parse_label

ASPECTS = ["safety", "actionability", "politeness", "meaningfulness"]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_labelled_jsonl_good_rows_and_skipped_rows_are_counted(tmp_path):
    f = write(tmp_path / "l.jsonl", "\n".join([
        json.dumps({"prompt": "p1", "response": "r1", "safety": 0.9, "politeness": None}),
        "",
        json.dumps({"prompt": "p2", "response": "r2", "actionability": 1}),
        json.dumps({"prompt": "p3", "response": "r3", "note": "no labels at all"}),
    ]) + "\n")
    report = LoadReport()
    rows = load_labelled(f, ASPECTS, report=report)
    assert [r.prompt for r in rows] == ["p1", "p2"]
    assert rows[0].labels["safety"] == 0.9 and math.isnan(rows[0].labels["politeness"])
    assert math.isnan(rows[0].labels["meaningfulness"]) and rows[1].labels["actionability"] == 1.0
    assert rows[0].source == "l"  # file stem when the row names none
    assert report.read == 3 and report.kept == 2 and sum(report.skipped.values()) == 1
    assert "skipped 1" in report.summary()


def test_labelled_csv_with_multiline_field(tmp_path):
    f = write(tmp_path / "l.csv", 'prompt,response,safety,meaningfulness,source\n'
                                  'p1,"line one\nline two",0.25,,mine\n'
                                  'p2,r2,,1,mine\n')
    rows = load_labelled(f, ASPECTS)
    assert rows[0].response == "line one\nline two" and rows[0].labels["safety"] == 0.25
    assert math.isnan(rows[0].labels["meaningfulness"]) and rows[1].labels["meaningfulness"] == 1.0


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "response": "r", "safety": 1.5}', "outside [0, 1]"),
    ('{"prompt": "p", "response": "r", "safety": "high"}', "not a number"),
    ('{"response": "r", "safety": 1}', "missing field 'prompt'"),
    ('{"prompt": "p", "response": "r", "safety": 1', "not valid JSON"),
    ('["p", "r"]', "expected an object"),
    ('{"prompt": "  ", "response": "r", "safety": 1}', "'prompt' is empty"),
])
def test_malformed_labelled_row_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "ok", "response": "ok", "safety": 1})
    f = write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{line}\n")
    with pytest.raises(DataError) as exc:
        load_labelled(f, ASPECTS)
    assert "bad.jsonl:3" in str(exc.value) and message in str(exc.value)


def test_malformed_csv_row_names_the_physical_line(tmp_path):
    f = write(tmp_path / "bad.csv", 'prompt,response,safety\n'
                                    'p1,"two\nlines",0.5\n'
                                    'p2,r2,0.5,extra\n')
    with pytest.raises(DataError, match=r"bad\.csv:4: expected 3 columns"):
        load_labelled(f, ASPECTS)


def test_prompts_jsonl_and_csv(tmp_path):
    f = write(tmp_path / "p.jsonl", "\n".join([
        json.dumps({"id": "a", "text": "hello", "kind": "benign", "category": "x"}),
        json.dumps({"id": "b", "messages": [{"role": "system", "content": "s"},
                                            {"role": "user", "content": "how?"}],
                    "kind": "harmful"}),
    ]) + "\n")
    ps = load_prompts(f)
    assert [(p.id, p.text, p.kind) for p in ps] == [("a", "hello", "benign"),
                                                    ("b", "how?", "harmful")]
    assert ps[1].messages[0]["role"] == "system" and ps[0].source == "p"
    c = write(tmp_path / "p.csv", "id,text,kind,source,category\n1,hi there,benign,me,chat\n")
    assert load_prompts(c)[0].to_dict() == {"id": "1", "text": "hi there", "kind": "benign",
                                            "source": "me", "category": "chat"}


@pytest.mark.parametrize("row, message", [
    ({"id": "a", "text": "t", "kind": "evil"}, "'kind' must be one of"),
    ({"id": " ", "text": "t", "kind": "benign"}, "non-empty 'id'"),
    ({"id": "a", "kind": "benign"}, "needs 'text'"),
    ({"id": "a", "messages": [{"role": "user"}], "kind": "benign"}, "'messages' must be"),
])
def test_malformed_prompt_rows(tmp_path, row, message):
    f = write(tmp_path / "p.jsonl", json.dumps(row) + "\n")
    with pytest.raises(DataError) as exc:
        load_prompts(f)
    assert "p.jsonl:1" in str(exc.value) and message in str(exc.value)


def test_a_prompt_row_without_id_or_kind_gets_its_line_as_id(tmp_path):
    rows = [{"prompt": "how do i bake bread", "topic": "baking"},
            {"prompt": [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hi"}]}]
    f = write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_prompts(f)
    assert (a.id, a.kind, a.text, a.columns, a.chat) == ("p-1", "", "how do i bake bread",
                                                         {"topic": "baking"},
                                                         "how do i bake bread")
    assert b.id == "p-2" and b.text == "hi" and b.chat == rows[1]["prompt"]
    assert b.to_dict()["messages"] == rows[1]["prompt"] and a.to_dict()["topic"] == "baking"


def test_duplicate_prompt_id_points_to_both_lines(tmp_path):
    row = json.dumps({"id": "a", "text": "t", "kind": "benign"})
    f = write(tmp_path / "p.jsonl", f"{row}\n{row}\n")
    with pytest.raises(DataError,
                       match=r"p\.jsonl:2: duplicate prompt id 'a' \(first at .*p\.jsonl:1\)"):
        load_prompts(f)


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="unsupported file type"):
        load_prompts(write(tmp_path / "p.txt", "x"))
    with pytest.raises(DataError, match="no such file"):
        load_labelled(tmp_path / "nope.jsonl", ASPECTS)


def test_parse_label_values():
    assert math.isnan(parse_label("", "a", "w")) and math.isnan(parse_label(None, "a", "w"))
    assert parse_label("0.5", "a", "w") == 0.5 and parse_label(True, "a", "w") == 1.0
    with pytest.raises(DataError, match="rescale"):
        parse_label(3, "a", "w")
