import json
import math

import pytest
import torch
from helpers import run_overrides

from mogrpo.cli import main
from mogrpo.config import load_config
from mogrpo.rl.dpo import DPOConfig, encode_pairs


def test_dpo_end_to_end_every_lora_tensor_changes(tiny_policy_dir, tiny_reward_model_dir,
                                                  prompt_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mogrpo.models import load_policy

    out = tmp_path / "dpo"
    torch.manual_seed(0)
    before, _ = load_policy(str(tiny_policy_dir), lora_r=4, lora_alpha=8)
    assert main(["train", "dpo", "--output", str(out), "--quiet",
                 *run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "dpo",
                                epochs=2)]) == 0
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    # at most one (best, worst) pair per prompt, and only with a margin above min_margin = 0
    assert 1 <= len(pairs) <= 8 and all(p["margin"] > 0 for p in pairs)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * ((len(pairs) + 3) // 4) and all(math.isfinite(r["loss"]) for r in rows)
    cost = json.loads((out / "cost.json").read_text())
    assert {"generation", "scoring", "reference",
            "policy_forward_backward"} <= set(cost["phase_seconds"])
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy_dir),
                                        out / "final")
    a = dict(trained.named_parameters())
    b = {n: p for n, p in before.named_parameters() if p.requires_grad}
    # LoRA A, B: 7 linears x 2
    assert len(b) == 28 and [n for n in b if torch.equal(b[n], a[n])] == []


def test_dpo_on_users_pairs_and_resume_reuses_pairs(tiny_policy_dir, tiny_reward_model_dir,
                                                    prompt_file, tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"how do i bake bread {i}",
                                     "chosen": "first make flour",
                                     "rejected": "you stupid idiot"}) + "\n" for i in range(6)))
    out = tmp_path / "own"
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "dpo", pairs=str(f),
                         epochs=3, lr=1e-2)
    assert main(["train", "dpo", "--output", str(out), "--quiet", *args]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["reward_accuracy"] == 1.0 and \
        rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c"}\n')
    assert main(["train", "dpo", "--output", str(tmp_path / "x"), "--quiet",
                 *run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "dpo",
                                epochs=2, pairs=str(bad))]) == 2


def test_encode_pairs_layout(tiny_policy_dir):
    from mogrpo.models import load_tokenizer

    tok = load_tokenizer(str(tiny_policy_dir))
    ids, attn, rmask = encode_pairs(tok, ["hi", "how do i bake bread"], ["yes", "first make flour"],
                                    8)
    L = rmask.shape[1]
    assert ids.shape == attn.shape and rmask.tolist()[0] == [1, 1] + [0] * (L - 2)  # "yes" + EOS
    # The response (with EOS) sits right after the prompt; pads are on the left of prompts.
    assert ids[0, -L:][: int(rmask[0].sum())].tolist()[-1] == tok.eos_token_id
    assert attn[0, 0] == 0 and attn[1, -L:].tolist() == rmask[1].tolist()


@pytest.mark.parametrize("overrides, message", [
    (["samples_per_prompt=1"], r"group_size \(samples per prompt\) must be >= 2"),
    (["loss_type=hinge"], "loss_type"),
    (["beta=0"], "beta must be > 0"),
])
def test_dpo_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(DPOConfig, None, overrides)


def test_dpo_resume_gives_the_same_weights(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                           tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import mogrpo.rl.dpo as d

    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "dpo", epochs=2,
                         save_every=2)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "dpo", "--output", str(full), "--quiet", *args]) == 0
    real = d.dpo_loss
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # third optimiser step, after the step-2 checkpoint
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(d, "dpo_loss", dying)
    # Ctrl-C: one line, exit 130
    assert main(["train", "dpo", "--output", str(part), "--quiet", *args]) == 130
    monkeypatch.setattr(d, "dpo_loss", real)
    assert main(["train", "dpo", "--output", str(part), "--quiet", "--resume", *args]) == 0
    a = load_file(str(full / "final" / "adapter_model.safetensors"))
    b = load_file(str(part / "final" / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.slow
def test_dpo_two_processes_equal_one_process(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                             tmp_path):
    """Under `accelerate launch --num_processes 2`, pair sampling (3 chunks round-robin),
    reference log-probs and every batch (split over the processes, a last short batch
    leaving one process a weight-0 pass) give the 1-process pairs and adapters. Measured:
    adapters within 5e-7 at lr 1e-2 (5e-6 at lr 5e-2: float rounding, amplified by Adam)."""
    from helpers import launch_two_processes
    from safetensors.torch import load_file

    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "dpo", epochs=2,
                         pair_prompts=7, generation_chunk=3, batch_size=3, warmup_steps=2,
                         save_every=2, lr=1e-2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "dpo", "--output", str(one), "--quiet", *args]) == 0
    launch_two_processes("dpo", two, args)
    assert (one / "pairs.jsonl").read_text() == (two / "pairs.jsonl").read_text()
    c1, c2 = (json.loads((d / "cost.json").read_text()) for d in (one, two))
    assert (c1["processes"], c2["processes"]) == (1, 2)
    assert (c1["pairs"], c1["tokens_generated"]) == (c2["pairs"], c2["tokens_generated"])
    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (one, two))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (one, two)]
    assert len(rows[0]) == len(rows[1]) == 2 * ((c1["pairs"] + 2) // 3)
    assert (two / "checkpoints" / "latest").is_file()
    for r1, r2 in zip(*rows, strict=True):
        for key in ("loss", "reward_margin", "reward_accuracy", "grad_norm", "lr"):
            assert r1[key] == pytest.approx(r2[key], abs=1e-5), key
