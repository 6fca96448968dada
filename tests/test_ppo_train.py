import json

import pytest
import torch

from conftest import run_overrides
from mogrpo.cli import main
from mogrpo.config import load_config
from mogrpo.rl.ppo import PPOConfig


def ppo_args(policy, rm, prompts, **kw):
    return run_overrides(policy, rm, prompts, {
        "batch_size": 8, "samples_per_prompt": 4, "minibatch_size": 4, "steps": 2, "ppo_epochs": 2,
        "critic_lr": 5e-2}, **kw)


def test_ppo_end_to_end_actor_and_critic_change(tiny_policy_dir, tiny_reward_model_dir, prompt_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mogrpo.models import load_policy

    out = tmp_path / "ppo"
    torch.manual_seed(0)
    before, _ = load_policy(str(tiny_policy_dir), lora_r=4, lora_alpha=8)
    assert main(["train", "ppo", "--output", str(out), "--quiet",
                 *ppo_args(tiny_policy_dir, tiny_reward_model_dir, prompt_file, save_every=1)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(r[k] == r[k] for k in ("loss", "value_loss", "kl", "entropy", "reward/safety/mean"))
    cost = json.loads((out / "cost.json").read_text())
    assert {"generation", "scoring", "reference", "critic", "policy_forward_backward"} <= set(cost["phase_seconds"])
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy_dir), out / "final")
    a = dict(trained.named_parameters())
    b = {n: p for n, p in before.named_parameters() if p.requires_grad}
    assert b and [n for n in b if torch.equal(b[n], a[n])] == []
    # The critic's head and adapters trained too (saved in the checkpoint after step 1).
    state = torch.load(out / "checkpoints" / "step-000001" / "trainer_state.pt", weights_only=False)
    assert state["critic"]["head.weight"].abs().sum() > 0  # initialised at zero


@pytest.mark.parametrize("overrides, message", [
    (["batch_size=10"], "not divisible by samples_per_prompt"),
    (["minibatch_size=3"], "multiple of minibatch_size"),
    (["lam=1.5"], "gamma and lam"),
])
def test_ppo_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(PPOConfig, None, overrides)


def test_ppo_resume_gives_the_same_weights(tiny_policy_dir, tiny_reward_model_dir, prompt_file, tmp_path,
                                           monkeypatch):
    from safetensors.torch import load_file

    from mogrpo.rl import scoring

    args = ppo_args(tiny_policy_dir, tiny_reward_model_dir, prompt_file, steps=4, save_every=2)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "ppo", "--output", str(full), "--quiet", *args]) == 0
    real = scoring.Scorer.score
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # step 3, after the step-2 checkpoint
            raise KeyboardInterrupt("simulated kill")
        return real(self, *a, **k)

    monkeypatch.setattr(scoring.Scorer, "score", dying)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "ppo", "--output", str(part), "--quiet", *args])
    monkeypatch.setattr(scoring.Scorer, "score", real)
    assert main(["train", "ppo", "--output", str(part), "--quiet", "--resume", *args]) == 0
    a = load_file(str(full / "final" / "adapter_model.safetensors"))
    b = load_file(str(part / "final" / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
