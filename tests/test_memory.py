"""The memory plan (mogrpo/memory.py) by hand, and against the model it describes."""

from dataclasses import replace

import pytest

from mogrpo.memory import QWEN25, GiB, Setting, Shape, gpus_needed, largest_micro_batch, plan


def test_parameter_counts_match_the_published_models():
    """Qwen2.5-0.5B / 7B / 14B: 0.49 B, 7.62 B, 14.77 B parameters (their model cards)."""
    assert QWEN25["0.5b"].params() == pytest.approx(0.494e9, rel=2e-3)
    assert QWEN25["7b"].params() == pytest.approx(7.616e9, rel=2e-3)
    assert QWEN25["14b"].params() == pytest.approx(14.77e9, rel=2e-3)


def test_counts_equal_a_built_model(tiny_qwen2_dir):
    """Parameters, Linear parameters and LoRA parameters of a real Qwen2 module and of PEFT's
    LoRA on it equal the formulas."""
    import torch
    from transformers import AutoModelForCausalLM

    from mogrpo.models import load_policy

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    c = model.config
    shape = Shape("tiny", c.num_hidden_layers, c.hidden_size, c.intermediate_size,
                  c.num_attention_heads, c.num_key_value_heads, c.vocab_size,
                  tied=c.tie_word_embeddings)
    assert shape.params() == sum(p.numel() for p in model.parameters())  # tied head counted once
    lin = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
              for m in model.modules()
              if type(m) is torch.nn.Linear
              and m.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr())
    assert shape.linear_params() == lin
    lora, _ = load_policy(str(tiny_qwen2_dir), lora_r=8)
    assert shape.lora_params(8) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_plan_by_hand():
    """A 1-layer toy: every part computed by hand."""
    s = Shape("toy", layers=1, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=10, tied=False,
              qkv_bias=False)
    # linears: q 64, k 32, v 32, o 64, gate 128, up 128, down 128 = 576; head 80 -> 656; embed 80;
    # norms 24
    assert (s.linear_params(), s.params(), s.lora_params(2)) == \
        (656, 760, 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24))
    full = plan(s, Setting(lora_r=0, micro_batch_size=1, prompt_tokens=1, completion_tokens=1,
                           sequences_sampled=1))
    assert full["weights"] == 760 * 4 and full["gradients"] == 760 * 4 and \
        full["optimizer (AdamW)"] == 760 * 8
    assert full["reference"] == 656 * 2 + 104 * 4  # Linear weights in bf16 under autocast
    assert full["KV cache (sampling)"] == 2 * 1 * 4 * 2 * 1 * 2  # K and V, kv_dim 4, 2 tokens, bf16
    assert full["activations"] == 2 * (20 * 8 + 6 * 4 + 8 * 16)
    assert full["log-prob head"] == 6 * 1 * 2 * 10
    assert full["autocast weight cache"] == 2 * 656 and full["optimizer step temporary"] == 760 * 4
    held = full["weights"] + full["optimizer (AdamW)"] + full["reference"]
    backward = held + full["gradients"] + full["activations"] + full["log-prob head"] + \
        full["autocast weight cache"]
    step = held + full["gradients"] + full["optimizer step temporary"]  # the larger moment here
    assert full["total"] == max(backward, step) == step
    lora = plan(s, Setting(lora_r=2, policy_dtype="bf16", micro_batch_size=1, prompt_tokens=1,
                           completion_tokens=1, sequences_sampled=1, world=2, sharded=True))
    assert lora["weights"] == (656 * 2 + 104 * 2) / 2 and lora["optimizer (AdamW)"] == 8 * 256 / 2
    # sharded: generate samples, whole on every process
    assert lora["merged generation copy"] == 656 * 2 + 104 * 2
    assert lora["rollout snapshot"] == 0
    # Unsharded, mogrpo's rollout engine: no merged copy; the layers' Linear weights (576, the
    # untied head is used as stored) in bf16, during sampling only.
    one = dict(micro_batch_size=1, prompt_tokens=1, completion_tokens=1, sequences_sampled=1)
    lora1 = plan(s, Setting(lora_r=2, policy_dtype="bf16", **one))
    assert lora1["merged generation copy"] == 0 and lora1["rollout snapshot"] == 576 * 2
    held = lora1["weights"] + lora1["trainable (fp32)"] + lora1["optimizer (AdamW)"]
    assert lora1["total"] >= held + lora1["KV cache (sampling)"] + lora1["rollout snapshot"]
    # full fine-tuning: a bf16 copy of the layers for the rollout
    assert full["rollout snapshot"] == 576 * 2
    tied = plan(replace(s, tied=True), Setting(lora_r=2, **one))
    # the tied head's bf16 cast, kept between rollouts
    assert tied["merged generation copy"] == 80 * 2
    assert plan(s, Setting(lora_r=2, rollout_engine="generate",
                           **one))["merged generation copy"] == 656 * 2 + 104 * 4
    # PPO's critic: the backbone without the output head (576 Linear + 104 other parameters)
    ppo_full = plan(s, Setting(lora_r=0, critic=True, micro_batch_size=1, prompt_tokens=1,
                               completion_tokens=1, sequences_sampled=1))
    assert ppo_full["critic"] == 4 * 680 * 4  # weights, gradients, two AdamW moments, fp32
    ppo_lora = plan(s, Setting(lora_r=2, policy_dtype="bf16", critic=True, micro_batch_size=1,
                               prompt_tokens=1, completion_tokens=1, sequences_sampled=1, world=2,
                               sharded=True))
    assert ppo_lora["critic"] == (576 * 2 + 104 * 2) / 2 + 16 * 256 / 2


def test_sizes_of_the_scale_configs():
    """What docs/scale.md states: 7B full fine-tuning does not fit one 80 GB card and needs 4
    with FSDP (2 at 141 GB); 14B LoRA with checkpointing fits one 80 GB card."""
    full = Setting(lora_r=0)
    assert gpus_needed(QWEN25["7b"], full, 80) == 0  # unsharded: never
    assert gpus_needed(QWEN25["7b"], Setting(lora_r=0, sharded=True), 80) == 4
    assert gpus_needed(QWEN25["7b"], Setting(lora_r=0, sharded=True), 141) == 2
    lora = Setting(lora_r=64, policy_dtype="bf16", gradient_checkpointing=True)
    assert gpus_needed(QWEN25["14b"], lora, 80) == 1
    assert largest_micro_batch(QWEN25["0.5b"], full, 76 * GiB) >= 16


def test_plan_counts_a_shared_prompt_once():
    """Groups of G = 4 sharing a 200-token prompt, 10-token completions: the engine's KV cache
    holds each prompt once (2 groups of 4 sampled: 2 x 200 + 8 x 10 tokens), the training
    forward of a micro-batch of 4 one prompt (200 + 4 x 10); without sharing, 4 x 210. A
    100-token prompt is copied into every sample's cache row (under 128 tokens)."""
    s = Shape("toy", layers=1, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=10, tied=False,
              qkv_bias=False)
    common = dict(lora_r=2, micro_batch_size=4, prompt_tokens=200, completion_tokens=10,
                  sequences_sampled=8)
    shared = plan(s, Setting(group_size=4, **common))
    whole = plan(s, Setting(group_size=4, shared_prefix=False, rollout_engine="generate", **common))
    per_token_kv, per_token_act = 2 * 1 * 4 * 2, 20 * 8 + 6 * 4 + 8 * 16
    assert shared["KV cache (sampling)"] == per_token_kv * (2 * 200 + 8 * 10)
    assert whole["KV cache (sampling)"] == per_token_kv * 8 * 210
    assert shared["activations"] == per_token_act * (200 + 4 * 10)
    assert whole["activations"] == per_token_act * 4 * 210
    short = plan(s, Setting(group_size=4, **{**common, "prompt_tokens": 100}))
    assert short["KV cache (sampling)"] == per_token_kv * 8 * 110
