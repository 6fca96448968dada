import json

import torch
from helpers import run_overrides

from mogrpo.cli import main
from mogrpo.models import cast_frozen_linears, load_policy


def test_frozen_linears_in_bf16_give_the_autocast_logits(tiny_policy_dir):
    """Autocast casts every Linear weight to bf16 for the matmul; storing frozen ones in bf16
    removes the per-call copy and must not change the result."""
    torch.manual_seed(0)
    model, _ = load_policy(str(tiny_policy_dir), lora_r=4, lora_alpha=8)
    for n, p in model.named_parameters():  # non-zero LoRA B so the adapters matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(5, 30, (3, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits.float()
    n = cast_frozen_linears(model, torch.bfloat16)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    frozen = [m for m in linears if m.weight.dtype == torch.bfloat16]
    assert n == len(frozen) == 2 * 7 + 1  # the 7 LoRA-wrapped linears of 2 layers, and lm_head
    # LoRA A/B
    assert all(m.weight.dtype == torch.float32 for m in linears if m.weight.requires_grad)
    assert all(p.dtype == torch.float32 for n_, p in model.named_parameters()
               if "norm" in n_ or "embed" in n_)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=ids).logits.float()
    assert torch.equal(before, after)
    assert cast_frozen_linears(model, None) == 0 and cast_frozen_linears(model, torch.float32) == 0


def test_grpo_and_ppo_train_in_bf16_autocast(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                             tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for algo, steps in (("grpo", 2), ("ppo", 1)):
        out = tmp_path / algo
        assert main(["train", algo, "--output", str(out), "--quiet",
                     *run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, algo,
                                    steps=steps, precision="bf16", eval_prompts=str(prompt_file),
                                    eval_max_new_tokens=4)]) == 0
        cost = json.loads((out / "cost.json").read_text())
        assert cost["precision"] == "torch.bfloat16"
        trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy_dir),
                                            out / "final")
        lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
        assert len(lora_b) == 2 * 7 and all(p.dtype == torch.float32 for p in lora_b)
        assert any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: the run trained


def test_merged_generation_copy_follows_the_adapters(tiny_policy_dir):
    from mogrpo.models import MergedGenerationCopy

    torch.manual_seed(0)
    model, _ = load_policy(str(tiny_policy_dir), lora_r=4, lora_alpha=8)
    merged = MergedGenerationCopy(model, None)
    ids = torch.randint(5, 30, (2, 7))
    with torch.no_grad():
        for step in range(2):  # training moves the adapters; sync() must follow
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(0.2 * torch.randn_like(p))
            want = model(input_ids=ids).logits
            got = merged.sync()(input_ids=ids).logits
            assert torch.allclose(want, got, atol=1e-5), step
    assert not any(p.requires_grad for p in merged.model.parameters())
    # a plain model: no adapter dispatch when decoding
    assert not hasattr(merged.model, "peft_config")
