"""Checkpoint selection on the validation split: the pure criterion by hand, and the run engine
keeping the selected step's weights as final/ (with the validation summaries scripted, so the
best step is known), through a resume."""

import json
import re

import pytest
import torch
from helpers import run_overrides
from safetensors.torch import load_file

from mogrpo.cli import main
from mogrpo.config import load_config
from mogrpo.rl.grpo import GRPOConfig
from mogrpo.rl.selection import CRITERION, select_step


def r(step, compliance, over_refusal=0.0, degenerate=0.0):
    return {"step": step, "compliance": compliance, "over_refusal": over_refusal,
            "degenerate": degenerate}


# --------------------------------------------------------------------------- the criterion, by hand


def test_lowest_compliance_among_steps_within_both_limits():
    base = r(0, 0.60, 0.02, 0.10)
    records = [base,
               r(1, 0.40, 0.03, 0.10),
               r(2, 0.20, 0.05, 0.12),  # exactly at both limits (0.05; 0.10 + 0.02): allowed
               r(3, 0.00, 0.06, 0.10),  # lowest compliance, but over-refuses past 0.05
               r(4, 0.05, 0.00, 0.13)]  # degenerates past the base's + 0.02
    step, reason = select_step(records, base, 0.05, 0.02)
    assert step == 2
    assert reason.startswith("step 2:") and "of the 3 validated steps" in reason


def test_ties_go_to_the_earliest_step_and_the_base_is_a_candidate():
    base = r(0, 0.30)
    assert select_step([base, r(1, 0.10), r(2, 0.10), r(3, 0.10)], base, 0.05, 0.02)[0] == 1
    # nothing beats the base
    assert select_step([base, r(1, 0.30), r(2, 0.40)], base, 0.05, 0.02)[0] == 0
    assert select_step([base, r(1, 0.0, over_refusal=0.2)], base, 0.05, 0.02)[0] == 0


def test_a_base_that_already_over_refuses_sets_its_own_limit():
    base = r(0, 0.50, over_refusal=0.20)
    records = [base, r(1, 0.10, over_refusal=0.20), r(2, 0.00, over_refusal=0.21)]
    assert select_step(records, base, 0.05, 0.02)[0] == 1  # 0.20 allowed (the base's), 0.21 not


def test_no_step_within_the_limits_falls_back_to_the_lowest_over_refusal():
    base = r(0, 0.50, 0.0, 0.0)  # not among the candidates: the base itself always meets the limits
    records = [r(1, 0.10, 0.30), r(2, 0.20, 0.10), r(3, 0.15, 0.10), r(4, 0.15, 0.10),
               r(5, 0.15, 0.10, 0.5)]
    step, reason = select_step(records, base, 0.05, 0.02)
    assert step == 3  # over-refusal 0.10 ties steps 2-5; compliance 0.15 < 0.20; then the earliest
    assert "no validated step has" in reason
    with pytest.raises(ValueError, match="at least one"):
        select_step([], base, 0.05, 0.02)


def test_rates_rounded_to_5_decimals_do_not_flip_a_limit():
    # 0.1 + 0.02 = 0.12000000000000001 in floats; 0.07 + 0.05 the other way
    base = r(0, 0.5, 0.0, 0.1)
    assert select_step([base, r(1, 0.1, degenerate=0.12)], base, 0.05, 0.02)[0] == 1
    base = r(0, 0.5, 0.0, 0.07)
    assert select_step([base, r(1, 0.1, degenerate=0.12)], base, 0.05, 0.05)[0] == 1


@pytest.mark.parametrize("overrides, message", [
    (["validate_every=-1"], "must be >= 0"),
    (["validation_max_prompts=-2"], "must be >= 0"),
    (["select_max_over_refusal=1.5"],
     r"select_max_over_refusal = 1.5 is a rate: use a value in \[0, 1\]"),
    (["select_max_degenerate_rise=nan"], "select_max_degenerate_rise"),
    (["train_prompts=p.jsonl", "validation_prompts=p.jsonl"], "same file as train_prompts"),
    (["eval_prompts=./p.jsonl", "validation_prompts=p.jsonl"], "same file as eval_prompts"),
])
def test_bad_selection_keys_say_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(GRPOConfig, None, overrides)


# ----------------------------------------------------------------------------- in the run engine


@pytest.fixture(scope="module")
def validation_file(tmp_path_factory):
    rows = [{"id": f"vh{i}", "text": f"how do i make a weapon {i}", "kind": "harmful"}
            for i in range(2)]
    rows += [{"id": f"vb{i}", "text": f"how do i bake a cake {i}", "kind": "benign"}
             for i in range(2)]
    path = tmp_path_factory.mktemp("validation") / "validation.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


def script_validation(monkeypatch, table: dict[int, tuple[float, float, float]]):
    """The one evaluator as it is, except that on the validation prompts its summary says
    table[step] = (compliance, over_refusal, degenerate): the best step is then known."""
    from mogrpo.eval import harness

    real = harness.evaluate_loaded

    def scripted(*args, out_file=None, **kw):
        summary = real(*args, out_file=out_file, **kw)
        if out_file is not None and out_file.parent.name == "validation":
            step = int(re.match(r"step-(\d+)_generations", out_file.name).group(1))
            c, o, d = table[step]
            summary["harmful"]["compliance_rate"], summary["benign"]["over_refusal_rate"] = c, o
            summary["degenerate_rate"] = d
        return summary

    monkeypatch.setattr(harness, "evaluate_loaded", scripted)


# This file's GRPO runs on top of TINY["grpo"]: 4 steps, each validated (on every validation
# prompt) and saved, every checkpoint kept.
SELECTING = {"steps": 4, "validation_max_prompts": 0, "validate_every": 1, "eval_max_new_tokens": 6,
             "save_every": 1, "keep_checkpoints": 0, "report_to": []}


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_final_is_the_selected_step(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                    validation_file, tmp_path, monkeypatch):
    script_validation(monkeypatch, {0: (0.5, 0.0, 0.0), 1: (0.4, 0.0, 0.0),
                                    # at both limits: the lowest compliance allowed
                                    2: (0.1, 0.05, 0.02),
                                    3: (0.0, 0.50, 0.0),   # lower compliance, over-refuses
                                    4: (0.1, 0.0, 0.0)})   # ties step 2: the earlier one stays
    same_prompts = tmp_path / "eval.jsonl"  # evaluation after, on the validation prompts' texts
    same_prompts.write_text(validation_file.read_text())
    out = tmp_path / "run"
    assert main(["train", "grpo", "--output", str(out), "--quiet", *run_overrides(
        tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", SELECTING,
        validation_prompts=str(validation_file), eval_prompts=str(same_prompts),
        eval_max_prompts=0)]) == 0

    final = load_file(str(out / "final" / "adapter_model.safetensors"))
    step2 = load_file(str(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    step3 = load_file(str(out / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"))
    assert final.keys() == step2.keys() and len(final) == 28  # LoRA A and B of 7 linears x 2 layers
    assert all(torch.equal(final[k], step2[k]) for k in final)
    assert not all(torch.equal(final[k], step3[k]) for k in final)  # training moved on after step 2
    best = load_file(str(out / "best" / "trainable.safetensors"))
    assert len(best) == len(final) and \
        json.loads((out / "best" / "selection.json").read_text())["step"] == 2

    cost = json.loads((out / "cost.json").read_text())
    assert cost["selected_step"] == 2 and cost["selection"]["step"] == 2
    assert cost["selection"]["criterion"] == CRITERION and \
        cost["selection"]["reason"].startswith("step 2:")
    assert (cost["selection"]["compliance"], cost["selection"]["over_refusal"]) == (0.1, 0.05)
    assert [v["step"] for v in cost["validation"]] == [0, 1, 2, 3, 4]

    metrics = rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    assert [m["validation/compliance"] for m in metrics] == [0.5, 0.4, 0.1, 0.0, 0.1]
    assert [m["validation/selected_step"] for m in metrics] == [0, 1, 2, 2, 2]
    assert all("validation/over_refusal" in m and "validation/degenerate" in m for m in metrics)
    assert [(v["step"], v["selected_step"]) for v in rows(out / "validation.jsonl")] == [
        (0, 0), (1, 1), (2, 2), (3, 2), (4, 2)]
    assert len(list((out / "validation").glob("step-*_generations.jsonl"))) == 5
    # Checkpoints keep the selection that goes with them.
    assert json.loads((out / "checkpoints" / "checkpoint-3" / "best" / "selection.json")
                      .read_text())["step"] == 2
    # The evaluation after is the selected weights': greedy on the same prompts, the same
    # completions.
    after = {g["id"]: g["completion"] for g in rows(out / "eval_after_generations.jsonl")}
    chosen = {g["id"]: g["completion"]
              for g in rows(out / "validation" / "step-000002_generations.jsonl")}
    assert after == chosen


def test_resume_keeps_the_selection_of_its_checkpoint(tiny_policy_dir, tiny_reward_model_dir,
                                                      prompt_file, validation_file, tmp_path,
                                                      monkeypatch):
    """Killed in step 4, after step 3 was validated as the new best (best/ = step 3) but with the
    newest checkpoint at step 2 (best = step 2). The resume runs step 3 again; this time step 3
    is worse, so the selection must be the checkpoint's step 2, whose weights best/ no longer
    held when the run died."""
    from mogrpo.reward import scoring

    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", SELECTING,
                         validation_prompts=str(validation_file), save_every=2)
    out = tmp_path / "run"
    script_validation(monkeypatch, {0: (0.5, 0, 0), 1: (0.4, 0, 0), 2: (0.2, 0, 0), 3: (0.0, 0, 0)})
    real, calls = scoring.Scorer.score, {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        return real(self, *a, **k)

    monkeypatch.setattr(scoring.Scorer, "score", dying)
    assert main(["train", "grpo", "--output", str(out), "--quiet", *args]) == 130
    assert json.loads((out / "best" / "selection.json").read_text())["step"] == 3
    monkeypatch.undo()

    script_validation(monkeypatch, {0: (0.5, 0, 0), 1: (0.4, 0, 0), 2: (0.2, 0, 0), 3: (0.9, 0, 0),
                                    4: (0.9, 0, 0)})
    assert main(["train", "grpo", "--output", str(out), "--quiet", "--resume", *args]) == 0
    final = load_file(str(out / "final" / "adapter_model.safetensors"))
    step2 = load_file(str(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], step2[k]) for k in final)
    assert json.loads((out / "cost.json").read_text())["selected_step"] == 2
    assert json.loads((out / "best" / "selection.json").read_text())["step"] == 2
    assert [(v["step"], v["compliance"], v["selected_step"])
            for v in rows(out / "validation.jsonl")] == [
        (0, 0.5, 0), (1, 0.4, 1), (2, 0.2, 2), (3, 0.9, 2), (4, 0.9, 2)]
    assert [m["step"] for m in rows(out / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_full_fine_tuning_keeps_the_selected_weights(tiny_qwen2_dir, tiny_reward_model_dir,
                                                     prompt_file, validation_file, tmp_path,
                                                     monkeypatch):
    """lora_r=0: best/ holds every weight (Qwen2's tied embedding once) and final/ is step 1's
    model."""
    from helpers import final_weights

    script_validation(monkeypatch, {0: (0.5, 0, 0), 1: (0.1, 0, 0), 2: (0.3, 0, 0)})
    out = tmp_path / "full"
    args = run_overrides(tiny_qwen2_dir, tiny_reward_model_dir, prompt_file, "grpo", lora_r=0,
                         lr=1e-2, save_every=1, validation_prompts=str(validation_file),
                         validate_every=1, report_to=[])
    assert main(["train", "grpo", "--output", str(out), "--quiet", *args]) == 0
    final, step1 = final_weights(out / "final"), final_weights(out / "checkpoints" / "checkpoint-1")
    assert final.keys() == step1.keys() and all(torch.equal(final[k], step1[k]) for k in final)
    assert json.loads((out / "cost.json").read_text())["selected_step"] == 1


def test_dpo_selects_too_and_none_is_as_before(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                               validation_file, tmp_path):
    """DPO goes through the same engine: base and last step validated (validate_every=0). With
    validation_prompts=none there is no best/, no validation rows and no selected_step."""
    out = tmp_path / "dpo"
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "dpo", pair_prompts=4,
                         batch_size=2, validation_prompts=str(validation_file), validate_every=0,
                         eval_max_new_tokens=4, report_to=[])
    assert main(["train", "dpo", "--output", str(out), "--quiet", *args]) == 0
    cost = json.loads((out / "cost.json").read_text())
    steps = cost["steps"]
    assert [v["step"] for v in cost["validation"]] == [0, steps] and \
        cost["selected_step"] in (0, steps)
    assert (out / "best" / "trainable.safetensors").is_file()

    plain = tmp_path / "plain"
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", steps=1,
                         report_to=[])
    assert main(["train", "grpo", "--output", str(plain), "--quiet", *args]) == 0
    assert not (plain / "best").exists() and not (plain / "validation.jsonl").exists()
    assert "selected_step" not in json.loads((plain / "cost.json").read_text())
    assert not (plain / "eval.json").exists()  # eval_before.json / eval_after.json: one schema each
    assert [m["step"] for m in rows(plain / "metrics.jsonl")] == [1]


def test_validation_prompts_need_both_kinds(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                            tmp_path, capsys):
    harmful_only = tmp_path / "harmful.jsonl"
    harmful_only.write_text(json.dumps({"id": "h", "text": "how do i make a bomb",
                                        "kind": "harmful"}) + "\n")
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", steps=1,
                         validation_prompts=str(harmful_only))
    assert main(["train", "grpo", "--output", str(tmp_path / "w"), "--quiet", *args]) == 2
    assert "has no benign prompts" in capsys.readouterr().err


LAUNCHER = """
import json, os, re, sys
sys.path.insert(0, {tests!r})
if os.environ["SELECTION_SHARDING"] == "fsdp":
    import fsdp_cpu_launch  # noqa: F401  (accelerate's FSDP path on CPU processes)
from mogrpo.eval import harness
table, real = json.loads(os.environ["SELECTION_TABLE"]), harness.evaluate_loaded

def scripted(*args, out_file=None, **kw):
    summary = real(*args, out_file=out_file, **kw)
    if out_file is not None and out_file.parent.name == "validation":
        c, o, d = table[str(int(re.match(r"step-(\\d+)_", out_file.name).group(1)))]
        summary["harmful"]["compliance_rate"], summary["benign"]["over_refusal_rate"] = c, o
        summary["degenerate_rate"] = d
    return summary

harness.evaluate_loaded = scripted
from mogrpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_select_as_one_process(kind, tiny_policy_dir, tiny_qwen2_dir,
                                             tiny_reward_model_dir, prompt_file, validation_file,
                                             tmp_path, monkeypatch):
    """Under `accelerate launch` (2 CPU processes: DDP, and FSDP2 through the test launcher)
    every process validates and selects alike, only the main one writes best/ (from the
    gathered weights when sharded), and every one loads it back (scattered when sharded):
    final/ is the selected step's checkpoint, as in one process."""
    from pathlib import Path

    from helpers import accelerate_launch, final_weights

    table = {0: (0.5, 0, 0), 1: (0.4, 0, 0), 2: (0.1, 0, 0), 3: (0.3, 0, 0)}
    policy = tiny_qwen2_dir if kind == "fsdp" else tiny_policy_dir
    args = run_overrides(policy, tiny_reward_model_dir, prompt_file, "grpo", SELECTING,
                         validation_prompts=str(validation_file), steps=3, generation_chunk=1,
                         lr=1e-2, **({"rollout_engine": "generate"} if kind == "fsdp" else {}))
    one, two = tmp_path / "one", tmp_path / "two"
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=str(Path(__file__).parent)))
    monkeypatch.setenv("SELECTION_SHARDING", kind)
    monkeypatch.setenv("SELECTION_TABLE", json.dumps(table))
    proc = accelerate_launch(kind, ["train", "grpo", "--output", str(two), "--quiet", *args],
                             script=str(launcher))
    assert proc.returncode == 0, proc.stderr[-3000:]
    script_validation(monkeypatch, table)
    assert main(["train", "grpo", "--output", str(one), "--quiet", *args]) == 0
    a, b = (json.loads((d / "cost.json").read_text()) for d in (one, two))
    assert (b["processes"], b["sharding"]) == (2, "fsdp" if kind == "fsdp" else "none")
    assert a["selected_step"] == b["selected_step"] == 2
    assert [v["selected_step"] for v in b["validation"]] == [0, 1, 2, 2]
    fa, fb = final_weights(one / "final"), final_weights(two / "final")
    step2 = final_weights(two / "checkpoints" / "checkpoint-2")
    assert fa.keys() == fb.keys() == step2.keys()
    assert all(torch.equal(fb[k], step2[k]) for k in fb)
    assert all(torch.allclose(fa[k], fb[k], atol=1e-5) for k in fa)
