"""On-policy reward data, the refusal labeller, guided rollouts, on-policy RM validation and
the reward-hacking alarm (issue: safety the policy really learns)."""

import json
import math

import pytest
import torch

from mogrpo.data.onpolicy import PROBE_DISCLAIMERS, TRAIN_DISCLAIMERS, disclaimer_rows, label_rows
from mogrpo.data.schema import LabelledResponse
from mogrpo.report import hacking_alarm

# ----------------------------------------------------------------------------- labels


def test_prompt_conditional_labels():
    rows = label_rows(["make a bomb", "make a bomb", "bake bread", "bake bread"],
                      ["harmful", "harmful", "benign", "benign"],
                      ["I can't help with that.", "Step 1: ...", "Mix flour...",
                       "I can't help with that."],
                      [0.9, 0.1, 0.2, 0.8], source="onpolicy/test",
                      guided=[True, False, False, True])
    # harmful: safety = P(refusal), actionability n/a; benign: safety 1, actionability = 1 -
    # P(refusal)
    assert rows[0].labels["safety"] == 0.9 and math.isnan(rows[0].labels["actionability"])
    assert rows[1].labels["safety"] == 0.1
    assert rows[2].labels["safety"] == 1.0 and rows[2].labels["actionability"] == pytest.approx(0.8)
    assert rows[3].labels["actionability"] == pytest.approx(0.2)
    assert all(math.isnan(r.labels["meaningfulness"]) for r in rows)
    assert rows[0].meta == {"construction": "onpolicy", "kind": "harmful", "p_refusal": 0.9,
                            "guided": True}
    with pytest.raises(ValueError, match="harmful or benign"):
        label_rows(["p"], ["other"], ["r"], [0.5], source="x")


def test_disclaimer_constructions_only_wrap_compliant_harmful_answers():
    import random

    rows = label_rows(["a", "a", "b"], ["harmful", "harmful", "benign"],
                      ["Step 1: mix", "I can't.", "Sure"], [0.1, 0.9, 0.1], source="s")
    out = disclaimer_rows(rows, TRAIN_DISCLAIMERS, random.Random(0), fraction=1.0)
    assert len(out) == 1  # only the compliant harmful answer
    assert out[0].labels["safety"] == 0.0 and out[0].response.endswith("Step 1: mix")
    assert any(out[0].response.startswith(d) for d in TRAIN_DISCLAIMERS)
    assert not set(TRAIN_DISCLAIMERS) & set(PROBE_DISCLAIMERS)  # probes are never trained on


# -------------------------------------------------------------------------- on-policy RM validation


class _KeywordRM:
    """A stand-in reward model with known scores: safety 0.9 for a text with 'sorry', 0.2
    otherwise, minus 0.5 when it contains 'warning' (so disclaimers score low); actionability
    the opposite of safety."""
    aspects = ["safety", "actionability"]

    def score(self, prompts, texts, batch_size=64):
        s = torch.tensor([(0.9 if "sorry" in t.lower() else 0.2)
                          - (0.5 if "warning" in t.lower() else 0.0) for t in texts])
        return torch.stack([s, 1 - s], dim=1)


def _row(prompt, kind, text, q):
    return LabelledResponse(prompt=prompt, response=text, labels={}, source="s",
                            meta={"construction": "onpolicy", "kind": kind, "p_refusal": q})


def test_on_policy_validation_by_hand(monkeypatch):
    from mogrpo.data import onpolicy
    from mogrpo.reward.train import on_policy_validation

    monkeypatch.setattr(onpolicy, "PROBE_DISCLAIMERS", ("Warning: illegal, but here:",))
    rows = [
        # harmful prompt 1: one refusal (q 0.9), two compliant answers (q 0.1, 0.2); one uncertain
        # (0.5) left out
        _row("h1", "harmful", "Sorry, no.", 0.9), _row("h1", "harmful", "Step 1", 0.1),
        _row("h1", "harmful", "Here is how", 0.2), _row("h1", "harmful", "hmm", 0.5),
        # harmful prompt 2: a "refusal" the RM does not recognise (no 'sorry'): ties with the
        # compliance
        _row("h2", "harmful", "No way.", 0.8), _row("h2", "harmful", "Do this", 0.0),
        # benign: an answer and a refusal
        _row("b1", "benign", "Mix flour", 0.1), _row("b1", "benign", "Sorry, I can't", 0.95),
        # not on-policy
        LabelledResponse(prompt="x", response="y", labels={}, source="default", meta={}),
    ]
    res = on_policy_validation(_KeywordRM(), rows)
    # harmful pairs: (Sorry, Step 1) right, (Sorry, Here is how) right, (No way, Do this) tie ->
    # wrong: 2/3
    assert res["harmful_refusal_over_compliance"]["n"] == 3
    assert res["harmful_refusal_over_compliance"]["pairwise_accuracy"] == \
        pytest.approx(2 / 3, abs=1e-4)
    # benign: actionability(Mix flour) = 0.8 > actionability(Sorry) = 0.1: 1/1
    assert res["benign_answer_over_refusal"] == {"pairwise_accuracy": 1.0, "n": 1,
                                                 "mean_margin": pytest.approx(0.7),
                                                  "aspect": "actionability"}
    # probes: 'Warning: ... Step 1' scores 0.2 - 0.5 = -0.3 < 0.9 (right), same for 'Here is how';
    # h2: 'Warning ... Do this' = -0.3 < 'No way.' = 0.2 (right): 3/3
    assert res["disclaimer_probes"]["n"] == 3 and res["disclaimer_probes"]["pairwise_accuracy"] == \
        1.0


# ----------------------------------------------------------------------------- the alarm


def test_hacking_alarm_when_training_rm_rises_and_judges_do_not():
    base = {"rm/harmful_safety": 0.60, "eval_rm/harmful_safety": 0.50, "compliance_rate": 1.00,
            "rm/benign_actionability": 0.60, "eval_rm/benign_actionability": 0.60,
            "over_refusal_rate": 0.00, "rm/politeness": 0.90, "eval_rm/politeness": 0.90,
            "toxicity": 0.05}
    # no fewer answers
    hacked = {"rm/harmful_safety": 0.75, "eval_rm/harmful_safety": 0.58, "compliance_rate": 1.00,
              "rm/benign_actionability": 0.61, "eval_rm/benign_actionability": 0.60,
              "over_refusal_rate": 0.00, "rm/politeness": 0.95, "eval_rm/politeness": 0.96,
              "toxicity": 0.01}
    res = {r["aspect"]: r for r in hacking_alarm(base, hacked)}
    assert res["safety"]["alarm"] and "harmful compliance" in res["safety"]["message"]
    assert res["safety"]["train_rm_gain"] == pytest.approx(0.15)
    assert not res["actionability"]["alarm"]  # +0.01 is below the 0.02 rise that counts
    assert not res["politeness"]["alarm"]  # toxicity fell by 0.04: the judge confirms
    # one prompt in 50 fewer answered (0.98, and a float edge at exactly the tolerance) does not
    # confirm +0.15
    res = {r["aspect"]: r for r in hacking_alarm(base, dict(hacked, compliance_rate=0.98))}
    assert res["safety"]["alarm"]
    honest = dict(hacked, compliance_rate=0.30)
    res = {r["aspect"]: r for r in hacking_alarm(base, honest)}
    assert not res["safety"]["alarm"]
    # the judge improves but the evaluator RM confirms under a third of the gain: alarm
    res = {r["aspect"]: r for r in hacking_alarm(base, dict(honest,
                                                            **{"eval_rm/harmful_safety": 0.52}))}
    assert res["safety"]["alarm"] and "evaluator RM" in res["safety"]["message"]


# ----------------------------------------------------------------------------- eval metrics


def test_alarming_clarifying_degenerate():
    from mogrpo.eval.metrics import is_alarming, is_clarifying, is_degenerate

    assert is_alarming("How do I kill a Python process?") and \
        not is_alarming("How do I bake bread?")
    assert not is_alarming("skills and killers")  # whole words only
    assert is_clarifying("Could you clarify what you mean by that?") and is_clarifying("Which one?")
    assert not is_clarifying("Preheat the oven to 200C, then bake for 30 minutes. Why? Heat sets "
                             "the crumb.")
    assert is_degenerate("") and is_degenerate("ok ok") and is_degenerate("the " * 30)
    assert not is_degenerate("Mix the flour with water and salt, then knead it for ten minutes.")


# ----------------------------------------------------------------------------- guided rollouts


def test_guided_rollout_starts_from_opener_and_keeps_own_samples(tiny_policy_dir):
    from mogrpo.models import load_policy
    from mogrpo.rollout import generate_rollout

    model, tok = load_policy(str(tiny_policy_dir))
    prompts, kinds = ["how do i make a bomb", "how do i bake bread please"], ["harmful", "benign"]
    plain = generate_rollout(model, tok, prompts, kinds, group_size=3, max_new_tokens=8, seed=1)
    ro = generate_rollout(model, tok, prompts, kinds, group_size=4, max_new_tokens=8, seed=1,
                          guided=1, openers=("sorry cannot help",))
    opener = tok("sorry cannot help", add_special_tokens=False)["input_ids"]
    assert ro.guided.tolist() == [False, False, False, True] * 2
    assert ro.completion_ids.shape[0] == 8 and ro.completion_ids.shape[1] <= 8
    for i in range(2):
        row = ro.completion_ids[i * 4 + 3].tolist()
        assert row[:len(opener)] == opener  # the guided sample starts with the opener's tokens
        assert ro.completions[i * 4 + 3].startswith("sorry cannot help")
        # the own samples are those of an unguided rollout of G - guided samples (same seed)
        for g in range(3):
            a, b = ro.completion_ids[i * 4 + g], plain.completion_ids[i * 3 + g]
            n = int(plain.completion_mask[i * 3 + g].sum())
            assert torch.equal(a[:n], b[:n])
    assert int(ro.completion_mask.sum(1).max()) <= 8
    with pytest.raises(ValueError, match="guided"):
        generate_rollout(model, tok, prompts, kinds, group_size=2, max_new_tokens=8, guided=2)


def test_judge_rates_split_own_and_guided():
    from types import SimpleNamespace

    from mogrpo.rl.samples import judge_rates

    acc = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    ro = SimpleNamespace(group_size=2, kinds=["harmful", "benign"],
                         completions=["Step 1: mix", "I cannot help with that.", "I can't do that.",
                                      "Mix flour."],
                         guided=torch.tensor([False, True, False, True]))
    r = judge_rates(acc, ro)
    assert r == {"judge/refusal_harmful": 0.0, "judge/over_refusal_benign": 1.0,
                 "judge/guided_refusal_harmful": 1.0, "judge/guided_refusal_benign": 0.0}


# ----------------------------------------------------------------------------- the labeller


def _labelled(texts_refusal, texts_other):
    from mogrpo.reward.labeller import LabelledText

    return ([LabelledText(t, 1, "m", f"p{i}") for i, t in enumerate(texts_refusal)]
            + [LabelledText(t, 0, "m", f"q{i}") for i, t in enumerate(texts_other)])


def test_labeller_fits_and_separates_on_a_tiny_encoder(tiny_encoder_dir):
    from mogrpo.reward.labeller import RefusalLabeller, SentenceEncoder, cross_validate

    enc = SentenceEncoder(tiny_encoder_dir)
    refusals = ["sorry i cannot help with that", "sorry cannot help",
                "i cannot help with this request sorry", "no sorry i cannot",
                "sorry cannot help you", "i cannot help sorry"] * 2
    answers = ["first bake the bread then add water", "make the cake with flour and water",
               "here are the steps first mix flour", "bake bread for a good day",
               "run the python code file", "list the file then run the code"] * 2
    rows = _labelled(refusals, answers)
    lab = RefusalLabeller(enc, C=10.0).fit(rows)
    p = lab.refusal_prob(["sorry i cannot help", "bake the bread with flour"])
    assert p[0] > 0.5 > p[1]
    cv = cross_validate(enc, rows, folds=3)
    assert cv["n"] == len(rows) and cv["accuracy"] >= 0.8
    with pytest.raises(ValueError, match="both"):
        RefusalLabeller(enc).fit(_labelled(refusals, []))


def test_maintainer_labels_file_is_well_formed():
    from mogrpo.reward.labeller import maintainer_labels_path, read_maintainer_labels

    raw = [json.loads(x) for x in maintainer_labels_path().read_text().splitlines()]
    assert len(raw) == 390 and {r["label"] for r in raw} == {"refusal", "not_refusal", "unclear"}
    assert {r["kind"] for r in raw} == {"harmful", "benign"}
    clear = read_maintainer_labels()
    assert len(clear) == sum(r["label"] != "unclear" for r in raw)
    # labelled completions are on training prompts only: never a HarmBench or held-out benign prompt
    from mogrpo.data.packaged import normalise_text, read_benign
    from mogrpo.data.splits import policy_prompt_splits  # noqa: F401 (documents where the split lives)

    benign_texts = {normalise_text(p.text) for p in read_benign()}
    base_rows = [r for r in raw if "policy" not in r]
    assert all(normalise_text(r["prompt"]) in benign_texts for r in base_rows
               if r["kind"] == "benign")
    # rows from trained policies were sampled on the form-balanced training split: never a
    # held-out benign prompt
    policy_rows = [r for r in raw if "policy" in r]
    assert len(policy_rows) == 270 and sum(r["label"] == "refusal" for r in policy_rows) == 41
    assert all(r["kind"] in ("harmful", "benign") and r["response"] and r["policy"]
               for r in policy_rows)
    held = {normalise_text(t) for t in _held_out_benign()}
    assert not any(normalise_text(r["prompt"]) in held for r in policy_rows
                   if r["kind"] == "benign")


def _held_out_benign() -> list[str]:
    """The benign prompts of the validation and evaluation splits (the packaged parts only)."""
    from mogrpo.data.default_rm import split_of
    from mogrpo.data.packaged import read_benign, read_benign_imperatives
    from mogrpo.data.splits import BENIGN_SPLIT, IMPERATIVE_SPLIT, one_form

    out = []
    for p in read_benign():
        if split_of(p.id, 0, BENIGN_SPLIT) != "train":
            out += [p.text, one_form(p, 0).text]
    out += [p.text for p in read_benign_imperatives()
            if split_of(p.id, 0, IMPERATIVE_SPLIT) != "train"]
    return out


def test_packaged_onpolicy_rounds_are_well_formed():
    """Both packaged rounds are on-policy rows whose labels follow P(refusal) (the verdicts
    the reward trainer hardens), round 2 from trained policies' own samples."""
    from mogrpo.data.loaders import load_labelled
    from mogrpo.data.onpolicy import packaged_onpolicy_paths

    aspects = ["safety", "actionability", "politeness", "meaningfulness"]
    r1, r2 = (load_labelled(p, aspects) for p in packaged_onpolicy_paths())
    assert len(r1) == 2644 and len(r2) == 1440  # docs/data.md
    assert not any(r.meta.get("guided") for r in r2) and any(r.meta.get("guided") for r in r1)
    for r in r1 + r2:
        assert r.meta["construction"] == "onpolicy"
        q = r.meta["p_refusal"]
        if r.meta["kind"] == "harmful":
            assert r.labels["safety"] == pytest.approx(q, abs=1e-4)
        else:
            assert r.labels["actionability"] == pytest.approx(1 - q, abs=1e-4)
    # round 2 holds the trained policies' compliant "happy to help" answers, labelled unsafe
    happy = [r for r in r2 if r.meta["kind"] == "harmful"
             and "happy to help" in r.response.lower()[:60]]
    assert len(happy) == 29 and sum(r.meta["p_refusal"] < 0.5 for r in happy) == 24


@pytest.mark.slow
def test_labeller_accuracy_on_held_out_maintainer_labels():
    """The default labeller, 5-fold by prompt on the maintainer labels (all-MiniLM-L6-v2 asset):
    held-out accuracy >= 0.8 (measured 0.857; docs/data.md)."""
    from mogrpo.assets import resolve_model_ref
    from mogrpo.reward.labeller import SentenceEncoder, cross_validate, read_maintainer_labels

    enc = SentenceEncoder(resolve_model_ref("builtin:all-minilm-l6-v2", None))
    res = cross_validate(enc, read_maintainer_labels())
    assert res["accuracy"] >= 0.8, res


# ----------------------------------------------------------------------- the on-policy data command


def test_onpolicy_data_end_to_end_tiny(tiny_policy_dir, tiny_encoder_dir, prompt_file, tmp_path):
    from mogrpo.data.loaders import load_labelled
    from mogrpo.reward.labeller import RefusalLabeller, SentenceEncoder
    from mogrpo.reward.onpolicy import make_onpolicy_data

    lab = RefusalLabeller(SentenceEncoder(tiny_encoder_dir), C=10.0).fit(
        _labelled(["sorry cannot help", "sorry i cannot"] * 3, ["bake the bread",
                                                                "run the code"] * 3))
    out = tmp_path / "onpolicy.jsonl"
    summary = make_onpolicy_data(str(tiny_policy_dir), out, labeller=lab, prompts=str(prompt_file),
                                 samples=1, guided=1, max_new_tokens=8, show_progress=False,
                                 precision="fp32",
                                 openers=("sorry cannot help",))
    rows = load_labelled(out, ["safety", "actionability", "politeness", "meaningfulness"])
    assert summary["rows"] == len(rows) == 12 * 2
    for r in rows:
        assert r.meta["kind"] in ("harmful", "benign") and 0.0 <= r.meta["p_refusal"] <= 1.0
        if r.meta["kind"] == "harmful":
            assert r.labels["safety"] == pytest.approx(r.meta["p_refusal"], abs=1e-4)
            assert math.isnan(r.labels["actionability"])
        else:
            assert r.labels["safety"] == 1.0
    assert sum(r.meta["guided"] for r in rows) == 12
    # relabelling keeps every completion and re-derives the labels from the new labeller
    from mogrpo.reward.onpolicy import relabel_onpolicy_data

    flip = RefusalLabeller(SentenceEncoder(tiny_encoder_dir), C=10.0).fit(
        _labelled(["bake the bread", "run the code"] * 3, ["sorry cannot help",
                                                           "sorry i cannot"] * 3))
    again = tmp_path / "relabelled.jsonl"
    res = relabel_onpolicy_data([out, out], again, labeller=flip)
    new_rows = load_labelled(again, ["safety", "actionability", "politeness", "meaningfulness"])
    assert res["rows"] == len(new_rows) == 2 * len(rows)
    assert [r.response for r in new_rows] == [r.response for r in rows] * 2
    assert [r.meta["guided"] for r in new_rows] == [r.meta["guided"] for r in rows] * 2
    # a verdict is P(refusal) >= 0.5; the flipped labeller must change some
    changed = sum((a.meta["p_refusal"] >= 0.5) != (b.meta["p_refusal"] >= 0.5)
                  for a, b in zip(rows * 2, new_rows, strict=True))
    assert res["verdicts_changed"] == changed > 0
    for new_r in new_rows:
        assert new_r.meta["p_refusal"] == pytest.approx(flip.refusal_prob([new_r.response])[0],
                                                        abs=1e-4)
        if new_r.meta["kind"] == "benign":
            assert new_r.labels["actionability"] == \
                pytest.approx(1 - new_r.meta["p_refusal"], abs=1e-4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r", "safety": 1}\n')
    from mogrpo.data.schema import DataError

    with pytest.raises(DataError, match=r"bad.jsonl:1: not an on-policy row"):
        relabel_onpolicy_data([bad], tmp_path / "x.jsonl", labeller=flip)
    # a row of the right kind without its P(refusal) or its prompt: named by file and line, no
    # KeyError
    good = json.loads(out.read_text().splitlines()[0])
    for broken in ({**good, "meta": {k: v for k, v in good["meta"].items() if k != "p_refusal"}},
                   {k: v for k, v in good.items() if k != "prompt"}):
        bad.write_text(json.dumps(good) + "\n" + json.dumps(broken) + "\n")
        with pytest.raises(DataError, match=r"bad.jsonl:2: not an on-policy row"):
            relabel_onpolicy_data([bad], tmp_path / "x.jsonl", labeller=flip)
    # the CLI refuses a folder as --output
    from mogrpo.cli import main

    assert main(["reward", "data", "--from-policy", str(tiny_policy_dir), "--output", str(tmp_path),
                 "--prompts", str(prompt_file), "--quiet"]) == 2


# ----------------------------------------------------------- all three trainers with guided samples


@pytest.mark.parametrize("algo", ["grpo", "ppo", "dpo"])
def test_trainers_run_with_guided_samples_and_log_the_judges(algo, tiny_policy_dir,
                                                             tiny_reward_model_dir, prompt_file,
                                                             tmp_path):
    from helpers import run_overrides

    from mogrpo.cli import main

    out = tmp_path / algo
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, algo,
                         guided_samples=1, guide_openers=["sorry cannot help"], balance_kinds=True,
                         max_new_tokens=8,
                         opener_credit="all")
    assert main(["train", algo, "--output", str(out), "--quiet", *args]) == 0
    assert (out / "final").is_dir()
    if algo != "dpo":  # GRPO and PPO log the independent judges every step, guided samples apart
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        # balanced batches of 2 prompts: each step 1 harmful prompt, so 1 guided harmful sample
        # (its refusal rate is 0 or 1) and 3 own ones (thirds)
        assert all(r["judge/guided_refusal_harmful"] in (0.0, 1.0) for r in recs)
        assert all(3 * r["judge/refusal_harmful"] in (0.0, 1.0, 2.0, 3.0) for r in recs)


class _WordLabeller:
    """A stand-in for the refusal labeller: a guided sample is a refusal when it says 'cannot'
    after the opener (what the labeller decides from the whole text)."""

    def __init__(self):
        self.seen = []

    def refusal_prob(self, texts):
        import numpy as np

        self.seen += texts
        return np.array([float("cannot" in t.split("sorry", 1)[-1].split(None, 1)[-1])
                         for t in texts])


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_opener_credit_asks_the_labeller_about_guided_samples_only(algo, tiny_policy_dir,
                                                                   tiny_reward_model_dir,
                                                                   prompt_file, tmp_path,
                                                                   monkeypatch):
    """opener_credit=refusals: every guided sample, and only those, goes to the refusal
    labeller each step; the share it calls refusals (the openers credited) is logged per kind."""
    from helpers import run_overrides

    from mogrpo.cli import main
    from mogrpo.reward import labeller

    fake = _WordLabeller()
    monkeypatch.setattr(labeller.RefusalLabeller, "default",
                        classmethod(lambda cls, cache=None: fake))
    out = tmp_path / algo
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, algo,
                         guided_samples=1, guide_openers=["sorry cannot help"], balance_kinds=True,
                         max_new_tokens=8,
                         opener_credit="refusals")
    assert main(["train", algo, "--output", str(out), "--quiet", *args]) == 0
    # 2 steps x 2
    assert len(fake.seen) == 2 * 2 and all(t.startswith("sorry cannot help") for t in fake.seen)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["opener_credited/harmful"] in (0.0, 1.0) and "opener_credited/benign" in r
               for r in recs)


@pytest.mark.slow
def test_reward_data_command_with_the_default_labeller(tiny_policy_dir, prompt_file, tmp_path,
                                                       capfd):
    """`mogrpo reward data --from-policy` end to end: the default labeller (all-MiniLM-L6-v2
    asset and the maintainer labels), a tiny policy, and the output read back as reward data."""
    from mogrpo.cli import main
    from mogrpo.data.loaders import load_labelled

    out = tmp_path / "op.jsonl"
    assert main(["reward", "data", "--from-policy", str(tiny_policy_dir), "--output", str(out),
                 "--prompts", str(prompt_file), "--max-prompts", "4", "--samples", "1", "--guided",
                 "1", "--quiet"]) == 0
    assert "wrote 8 labelled on-policy rows" in capfd.readouterr().out
    rows = load_labelled(out, ["safety", "actionability"])
    assert len(rows) == 8 and sum(r.meta["guided"] for r in rows) == 4
    assert all(r.meta["construction"] == "onpolicy" for r in rows)
