"""RLOO, the fourth algorithm on the run engine: its advantage by hand, a tiny end-to-end
run, kill-and-resume, and its place in `mogrpo run`'s report."""

import json
import math

import pytest
import torch
from helpers import run_overrides

from mogrpo.cli import main
from mogrpo.rl.rloo import rloo_advantages


def test_rloo_advantages_by_hand():
    # group 1: scores 1, 2, 3, 6. Baseline of sample 1 = mean(2, 3, 6) = 11/3, so A = 1 - 11/3 =
    # -8/3;
    # sample 2: 2 - (1+3+6)/3 = -4/3; sample 3: 3 - (1+2+6)/3 = 0; sample 4: 6 - (1+2+3)/3 = 4.
    # group 2: equal scores -> 0 everywhere (nothing to prefer).
    adv = rloo_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]]))
    assert torch.allclose(adv, torch.tensor([[-8 / 3, -4 / 3, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]]))
    # The advantages of a group sum to 0, and equal G/(G-1) x (score - group mean).
    s = torch.tensor([[0.3, -1.2, 2.0]])
    assert torch.allclose(rloo_advantages(s), 1.5 * (s - s.mean()), atol=1e-6)
    # A NaN score (no aspect to score) gets 0 and leaves the others' baselines: 1 - 4 = -3, 4 - 1 =
    # 3.
    adv = rloo_advantages(torch.tensor([[1.0, math.nan, 4.0], [2.0, math.nan, math.nan]]))
    assert torch.allclose(adv, torch.tensor([[-3.0, 0.0, 3.0], [0.0, 0.0, 0.0]]))


def test_rloo_end_to_end_trains_and_logs(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                         tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "rloo"
    assert main(["train", "rloo", "--output", str(out), "--quiet", *run_overrides(
        tiny_policy_dir, tiny_reward_model_dir, prompt_file, "rloo", eval_prompts=str(prompt_file),
        eval_max_prompts=4, eval_max_new_tokens=4, sample_every=1)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(r[k])
                   for k in ("loss", "kl", "reward/combined/mean", "advantage/abs_mean",
                             "grad_norm"))
        # one pass: the behaviour policy is the policy
        assert r["ratio/min"] == pytest.approx(1.0, abs=1e-4)
    # LoRA B starts at 0
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and rows[1]["kl"] != 0.0
    cost = json.loads((out / "cost.json").read_text())
    assert {"generation", "scoring", "reference",
            "policy_forward_backward"} <= set(cost["phase_seconds"])
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    ev = json.loads((out / "eval_after.json").read_text())  # `mogrpo eval`'s schema
    assert ev["n"] == 4 and 0 <= ev["harmful"]["compliance_rate"] <= 1
    assert (out / "samples.jsonl").is_file()


def test_rloo_resume_gives_the_same_weights(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                            tmp_path, monkeypatch):
    from helpers import kill_and_resume

    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "rloo", steps=4,
                         save_every=2)
    _, part = kill_and_resume("rloo", args, tmp_path, monkeypatch)
    assert [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4]


@pytest.mark.slow
def test_rloo_two_processes_equal_one_process(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                              tmp_path):
    from helpers import launch_two_processes
    from safetensors.torch import load_file

    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "rloo", steps=1,
                         generation_chunk=1, lr=1e-2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "rloo", "--output", str(one), "--quiet", *args]) == 0
    launch_two_processes("rloo", two, args)
    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (one, two))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    r1, r2 = (json.loads((d / "metrics.jsonl").read_text().splitlines()[0]) for d in (one, two))
    for key in ("kl", "reward/combined/mean", "advantage/abs_mean", "loss"):
        assert r1[key] == pytest.approx(r2[key], abs=1e-5), key


def test_rloo_in_the_pipeline_report(tiny_encoder_dir, tiny_policy_dir, prompt_file,
                                     toy_toxicity_dir, tmp_path):
    from helpers import pipeline_config

    cfg = pipeline_config(tmp_path, tiny_encoder_dir, tiny_policy_dir, prompt_file,
                          toy_toxicity_dir, algorithms=("grpo", "rloo"))
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["base", "grpo", "rloo"] and "rloo" in report["cost"]
    assert "| rloo |" in (out / "report.md").read_text()
