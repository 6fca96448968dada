import json
import math

import pytest
import torch
from helpers import kill_and_resume, launch_two_processes, run_overrides

from mogrpo.cli import main
from mogrpo.config import load_config
from mogrpo.rl.ppo import PPOConfig

# This file's runs on top of TINY["ppo"]: two passes over each rollout, a fast critic.
PPO = {"num_iterations": 2, "critic_lr": 5e-2}


def test_ppo_end_to_end_actor_and_critic_change(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                                tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mogrpo.models import load_policy

    out = tmp_path / "ppo"
    torch.manual_seed(0)
    before, _ = load_policy(str(tiny_policy_dir), lora_r=4, lora_alpha=8)
    assert main(["train", "ppo", "--output", str(out), "--quiet",
                 *run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "ppo", PPO,
                                save_every=1)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "value_loss", "kl", "entropy",
                                                 "rewards/safety/mean"))
    cost = json.loads((out / "cost.json").read_text())
    assert {"generation", "scoring", "reference", "critic",
            "policy_forward_backward"} <= set(cost["phase_seconds"])
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy_dir),
                                        out / "final")
    a = dict(trained.named_parameters())
    b = {n: p for n, p in before.named_parameters() if p.requires_grad}
    # LoRA A, B: 7 linears x 2
    assert len(b) == 28 and [n for n in b if torch.equal(b[n], a[n])] == []
    # The critic's head and adapters trained too (saved in the checkpoint after step 1).
    state = torch.load(out / "checkpoints" / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert state["algorithm"]["critic"]["head.weight"].abs().sum() > 0  # initialised at zero


@pytest.mark.parametrize("overrides, message", [
    (["batch_size=10"], "not divisible by group_size"),
    (["minibatch_size=3"], "multiple of minibatch_size"),
    (["lam=1.5"], "gamma and lam"),
])
def test_ppo_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(PPOConfig, None, overrides)


def test_ppo_resume_gives_the_same_weights(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                           tmp_path, monkeypatch):
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "ppo", PPO, steps=4,
                         save_every=2)
    kill_and_resume("ppo", args, tmp_path, monkeypatch)


def test_global_whiten_on_one_process_and_over_two_shards_equals_whiten():
    """The distributed whitening: one process (identity sum) and two "processes" (threads
    whose sum meets at a barrier) holding halves of the rows both give `whiten`'s result."""
    import threading

    from mogrpo.rl.losses import whiten
    from mogrpo.rl.ppo import global_whiten

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g) * 3 + 1
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1
    ref = whiten(x, mask)
    assert torch.allclose(global_whiten(x, mask), ref, atol=1e-6)
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def shard(r):
        def all_sum(t):
            slots[r] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read before either writes its next value
            return total

        results[r] = global_whiten(x[3 * r:3 * r + 3], mask[3 * r:3 * r + 3], all_sum)

    threads = [threading.Thread(target=shard, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat(results), ref, atol=1e-6)


def test_owned_share_weights_give_the_full_minibatch_token_mean():
    """Each process's token-mean loss over the minibatch rows it holds, times its weight,
    averaged over processes (what DDP does to gradients), is the 1-process token mean."""
    from mogrpo.runtime import owned_share

    g = torch.Generator().manual_seed(1)
    world, n_local = 3, 4
    values = torch.randn(world * n_local, 7, generator=g)
    mask = torch.zeros(world * n_local, 7)
    for i, n in enumerate(torch.randint(1, 8, (world * n_local,), generator=g).tolist()):
        mask[i, :n] = 1
    lengths = mask.sum(1)
    for members in ([0, 5, 11, 6], [1, 2, 3], [9], list(range(12))):
        want = (values[members] * mask[members]).sum() / mask[members].sum()
        got = 0.0
        for r in range(world):
            mine, w = owned_share(members, n_local, r, lengths)
            assert all(r * n_local <= r * n_local + j < (r + 1) * n_local for j in mine)
            if not mine:
                assert w == 0.0
                continue
            rows = [r * n_local + j for j in mine]
            got += w * (values[rows] * mask[rows]).sum() / mask[rows].sum() / world
        assert float(got) == pytest.approx(float(want), abs=1e-6), members


def test_batch_must_split_into_whole_groups_per_process():
    from mogrpo.rl.config import check_batch_splits

    check_batch_splits(16, 4)(2)
    check_batch_splits(8, 4)(1)
    with pytest.raises(ValueError, match="multiple of group_size \\* processes = 8"):
        check_batch_splits(12, 4)(2)


@pytest.mark.slow
def test_ppo_two_processes_equal_one_process(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                             tmp_path):
    """Same global batch and seed under `accelerate launch --num_processes 2`: the same
    completions (per-prompt seeding), globally whitened advantages and minibatches split
    by ownership give the 1-process actor and critic. minibatch_size=2 makes many
    minibatches held by one process only (the other runs a weight-0 pass); warm-up
    checks the scheduler steps once per update, not once per process; the gradient norms
    (before clipping) check the gradients' scale, which Adam's updates would hide.
    Measured: adapters within 2e-7, critic within 1.2e-6 (lr 1e-2); at lr 5e-2 float
    rounding is amplified to ~1e-4 over the 16 Adam updates, the gradients still agreeing
    to 1e-7 (relative) at the first update."""
    from safetensors.torch import load_file

    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "ppo", PPO,
                         minibatch_size=2, generation_chunk=1, warmup_steps=3, save_every=1,
                         lr=1e-2, critic_lr=1e-2,
                         eval_prompts=str(prompt_file), eval_max_prompts=4, eval_max_new_tokens=4)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "ppo", "--output", str(one), "--quiet", *args]) == 0
    launch_two_processes("ppo", two, args)
    c1, c2 = (json.loads((d / "cost.json").read_text()) for d in (one, two))
    assert (c1["processes"], c2["processes"]) == (1, 2)
    assert c1["tokens_generated"] == c2["tokens_generated"]
    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (one, two))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    s1, s2 = (torch.load(d / "checkpoints" / "checkpoint-1" / "trainer_state.pt", weights_only=True)
              for d in (one, two))
    cr1, cr2 = s1["algorithm"]["critic"], s2["algorithm"]["critic"]
    assert cr1.keys() == cr2.keys()
    for k in cr1:
        assert torch.allclose(cr1[k], cr2[k], atol=1e-5), k
    # 2 epochs x 4 minibatches
    assert s1["scheduler"]["last_epoch"] == s2["scheduler"]["last_epoch"] == 8
    for r1, r2 in zip(*((json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines())
                        for d in (one, two)), strict=True):
        for key in ("lr", "kl", "reward/combined/mean", "rewards/safety/std", "loss", "value_loss",
                    "entropy", "advantage/std", "value/mean", "completion_length", "grad_norm",
                    "critic_grad_norm"):
            assert r1[key] == pytest.approx(r2[key], abs=1e-5), key
    e1, e2 = (json.loads((d / "eval_after.json").read_text()) for d in (one, two))
    assert e1["n"] == e2["n"] == 4
    assert e1["combined"] == pytest.approx(e2["combined"], abs=1e-4)
    assert e1["harmful"]["compliance_rate"] == e2["harmful"]["compliance_rate"]
