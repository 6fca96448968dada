import json

import pytest
import torch

from mogrpo.cli import main
from mogrpo.config import load_config
from mogrpo.rl.grpo import GRPOConfig, train_grpo


def tiny_args(policy, rm, prompts, **kw):
    base = {"policy": str(policy), "reward_model": str(rm), "train_prompts": str(prompts),
            "eval_prompts": str(prompts), "eval_max_prompts": 4, "eval_max_new_tokens": 6,
            "weights": {"safety": 1.0, "actionability": 1.0, "politeness": 0.5},
            "batch_size": 8, "group_size": 4, "max_new_tokens": 8, "steps": 2, "micro_batch_size": 4,
            "lr": 5e-2, "warmup_steps": 0, "lora_r": 4, "lora_alpha": 8, "save_every": 0,
            "precision": "fp32", "sample_every": 1}
    base.update(kw)
    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


def test_grpo_end_to_end_every_trainable_parameter_changes(tiny_policy_dir, tiny_reward_model_dir,
                                                           prompt_file, tmp_path):
    out = tmp_path / "run"
    from mogrpo.models import load_policy

    torch.manual_seed(0)  # the run seeds the same way right before loading the policy
    before, _ = load_policy(str(tiny_policy_dir), lora_r=4, lora_alpha=8)
    assert main(["train", "grpo", "--output", str(out), "--quiet",
                 *tiny_args(tiny_policy_dir, tiny_reward_model_dir, prompt_file)]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        assert all(k in r for k in ("reward/safety/mean", "reward/safety/std", "reward/combined/mean", "kl",
                                    "clip_fraction", "entropy", "completion_length", "zero_variance_fraction",
                                    "tokens_per_s", "step_seconds", "peak_memory_mb", "advantage/std"))
        assert r["loss"] == r["loss"]  # finite
    cost = json.loads((out / "cost.json").read_text())
    assert set(cost["phase_seconds"]) >= {"generation", "scoring", "policy_forward_backward", "reference"}
    assert cost["tokens_generated"] > 0
    assert (out / "config.yaml").is_file() and json.loads((out / "eval.json").read_text())["eval_after"]
    # The adapter saved in final/ differs from the initial one in every LoRA tensor.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy_dir), out / "final")
    b = {n: p for n, p in before.named_parameters() if p.requires_grad}
    a = dict(trained.named_parameters())
    assert b and all(n in a for n in b)
    assert torch.equal(b[next(iter(b))], b[next(iter(b))])
    unchanged = [n for n in b if torch.equal(b[n], a[n])]
    assert unchanged == []


def test_full_finetune_changes_every_parameter(tiny_policy_dir, tiny_reward_model_dir, prompt_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    args = tiny_args(tiny_policy_dir, tiny_reward_model_dir, prompt_file, lora_r=0, lr=1e-2, steps=1,
                     eval_prompts="none")
    assert main(["train", "grpo", "--output", str(out), "--quiet", *args]) == 0
    a = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    b = AutoModelForCausalLM.from_pretrained(out / "final")
    changed = {n: not torch.equal(p, dict(b.named_parameters())[n]) for n, p in a.named_parameters()}
    # Embedding rows of unused tokens move too (the matrix changes as a whole).
    assert all(changed.values()), [n for n, c in changed.items() if not c]


def test_resume_gives_the_same_weights(tiny_policy_dir, tiny_reward_model_dir, prompt_file, tmp_path, monkeypatch):
    args = tiny_args(tiny_policy_dir, tiny_reward_model_dir, prompt_file, steps=4, save_every=2,
                     eval_prompts="none")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "grpo", "--output", str(full), "--quiet", *args]) == 0
    calls = {"n": 0}

    # Kill the run during step 3 (after the step-2 checkpoint) by failing the scorer.
    from mogrpo.rl import scoring

    real_score = scoring.Scorer.score

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_score(self, *a, **k)

    monkeypatch.setattr(scoring.Scorer, "score", dying)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "grpo", "--output", str(part), "--quiet", *args])
    monkeypatch.setattr(scoring.Scorer, "score", real_score)
    assert (part / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert main(["train", "grpo", "--output", str(part), "--quiet", "--resume", *args]) == 0
    from safetensors.torch import load_file

    a = load_file(str(full / "final" / "adapter_model.safetensors"))
    b = load_file(str(part / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    metrics = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3, 4] or metrics[-2:] == [3, 4]


@pytest.mark.parametrize("overrides, message", [
    (["group_size=1"], "G >= 2"),
    (["batch_size=10", "group_size=4"], "not divisible by group_size"),
    (["advantage_mode=lagrangian"], "needs thresholds"),
    (["thresholds={safety: 0.9}"], "only apply with advantage_mode=lagrangian"),
    (["loss_aggregation=mean"], "loss_aggregation must be one of"),
])
def test_bad_config_says_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(GRPOConfig, None, overrides)


def test_unknown_columns_fail_early():
    cfg = load_config(GRPOConfig, None, ["weights={safety: 1, honesty: 1}"])
    with pytest.raises(ValueError, match=r"weights name \['honesty'\]"):
        cfg.check_columns(["safety", "actionability"])
    cfg = load_config(GRPOConfig, None, ["advantage_mode=lagrangian", "thresholds={harmlessness: 0.9}"])
    with pytest.raises(ValueError, match=r"thresholds name \['harmlessness'\]"):
        cfg.check_columns(["safety", "actionability", "politeness", "meaningfulness"])
