"""Shared-prefix packing (mogrpo/packing.py) is the plain forward, exactly: log-probs, every
LoRA gradient, the reference pass, the PPO value head and a whole GRPO run, fp32, on tiny
Llama and Qwen2 models with groups of 4 sharing a prompt, prompts padded left or right."""

import json

import pytest
import torch
from helpers import run_overrides, tiny_qwen2_config

from mogrpo import packing
from mogrpo.cli import main
from mogrpo.rollout import completion_logprobs

G = 4


def _model(family: str, attn: str = "sdpa", backbone: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, Qwen2ForCausalLM, Qwen2Model

    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
        cls = LlamaModel if backbone else LlamaForCausalLM
    else:
        cfg = tiny_qwen2_config(64)
        cls = Qwen2Model if backbone else Qwen2ForCausalLM
    cfg._attn_implementation = attn
    model = cls(cfg)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             task_type="FEATURE_EXTRACTION" if backbone
                                             else "CAUSAL_LM"))
    for name, p in model.named_parameters():  # LoRA B starts at 0: make every adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model.float()


def _batch(prompt_side: str, seed: int = 0):
    """2 prompts (lengths 9 and 5) x G=4 completions (lengths 1..7), as a rollout lays them out:
    prompt rows repeated per group, padded on `prompt_side`; completions right-padded. (Both
    paths left-pad a right-padded prompt first: `packing.trim_columns`.)"""
    g = torch.Generator().manual_seed(seed)
    P, L = 9, 7
    ids, mask = [], []
    for p_len, c_lens in ((9, (7, 3, 5, 1)), (5, (2, 7, 4, 6))):
        prompt = torch.randint(1, 64, (p_len,), generator=g)
        for c in c_lens:
            pad = torch.zeros(P - p_len, dtype=torch.long)
            row_p = torch.cat([pad, prompt]) if prompt_side == "left" else torch.cat([prompt, pad])
            m_p = torch.cat([torch.zeros(P - p_len),
                             torch.ones(p_len)]) if prompt_side == "left" else \
                torch.cat([torch.ones(p_len), torch.zeros(P - p_len)])
            comp = torch.randint(1, 64, (L,), generator=g)
            m_c = (torch.arange(L) < c).float()
            ids.append(torch.cat([row_p, comp * m_c.long()]))
            mask.append(torch.cat([m_p, m_c]))
    return torch.stack(ids), torch.stack(mask).long(), L


def _grads(model, ids, mask, L, shared):
    model.zero_grad(set_to_none=True)
    logp, ent = completion_logprobs(model, ids, mask, L, with_entropy=True, shared_prefix=shared)
    w = torch.linspace(-1, 1, logp.numel()).reshape(logp.shape)
    (logp * mask[:, -L:] * w).sum().backward()
    return logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters()
                                if p.requires_grad}


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= rel * max(float(b.abs().max()), 1e-12)


def test_pack_layout_by_hand():
    """Two prompts x 2 completions: one row per prompt, slots after it, the mask by hand."""
    ids = torch.tensor([[0, 5, 6, 7, 8, 0],  # prompt [5, 6] left-padded, completion [7, 8]
                        [0, 5, 6, 9, 0, 0],  # same prompt, completion [9]
                        [4, 3, 2, 1, 0, 0],  # prompt [4, 3, 2], completion [1]
                        [4, 3, 2, 6, 6, 0]])
    mask = (ids != 0).long()
    pk = packing.pack(ids, mask, 3)
    assert pk.slots == 2 and pk.width == 2  # the third completion column is padding everywhere
    # rows are the distinct prompts (torch.unique order), right-aligned in a prefix of 3
    row_a = int(pk.seq_slot[0]) // 2
    assert pk.input_ids[row_a].tolist() == [0, 5, 6, 7, 8, 9, 0]
    assert pk.position_ids[row_a].tolist() == [0, 0, 1, 2, 3, 2, 2]
    allowed = pk.allowed[row_a].long()
    assert allowed.tolist() == [[1, 0, 0, 0, 0, 0, 0],  # padding query: itself only
                                [0, 1, 0, 0, 0, 0, 0],
                                [0, 1, 1, 0, 0, 0, 0],
                                [0, 1, 1, 1, 0, 0, 0],  # slot 0 token 0: prompt + itself
                                [0, 1, 1, 1, 1, 0, 0],
                                [0, 1, 1, 0, 0, 1, 0],  # slot 1 token 0: prompt, not slot 0
                                [0, 1, 1, 0, 0, 1, 1]]  # slot 1 padding: as a real token, + itself
    # before each token: the prompt's last, then the slot's own
    assert pk.keep.tolist() == [2, 3, 2, 5]
    assert pk.targets[pk.seq_slot].tolist() == [[7, 8], [9, 0], [1, 0], [6, 6]]
    # nothing shared: no packing
    assert packing.pack(ids[[0, 2]], mask[[0, 2]], 3) is None


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("prompt_side", ["left", "right"])
def test_shared_prefix_logprobs_and_lora_gradients_equal_plain(family, prompt_side):
    model = _model(family)
    ids, mask, L = _batch(prompt_side)
    assert packing.pack(ids, mask, L).slots == G
    lp0, ent0, g0 = _grads(model, ids, mask, L, shared=False)
    lp1, ent1, g1 = _grads(model, ids, mask, L, shared=True)
    real = mask[:, -L:].bool()
    assert float((lp0 - lp1)[real].abs().max()) <= 1e-5
    assert float((ent0 - ent1)[real].abs().max()) <= 1e-5
    assert len(g0) == 2 * 7 * 2 and set(g0) == set(g1)  # lora A and B of 7 linears x 2 layers
    for name in g0:
        assert g0[name].abs().max() > 0, name
        assert _close(g1[name], g0[name]), (name, float((g1[name] - g0[name]).abs().max()))


def test_eager_attention_and_a_partial_group_equal_plain():
    """The additive mask of eager attention; a micro-batch holding 3 of one group and 1 of the
    other (slots left empty)."""
    model = _model("llama", attn="eager")
    ids, mask, L = _batch("left", seed=1)
    rows = torch.tensor([1, 2, 3, 4])
    lp0, _, g0 = _grads(model, ids[rows], mask[rows], L, shared=False)
    lp1, _, g1 = _grads(model, ids[rows], mask[rows], L, shared=True)
    real = mask[rows][:, -L:].bool()
    assert float((lp0 - lp1)[real].abs().max()) <= 1e-5
    for name in g0:
        assert _close(g1[name], g0[name]), name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reference_pass_equals_plain(family):
    model = _model(family)
    ids, mask, L = _batch("left")
    real = mask[:, -L:].bool()
    with torch.no_grad(), model.disable_adapter():
        a = completion_logprobs(model, ids, mask, L, shared_prefix=False)[0]
        b = completion_logprobs(model, ids, mask, L, shared_prefix=True)[0]
    assert float((a - b)[real].abs().max()) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_value_head_and_its_gradients_equal_plain(family):
    from mogrpo.rl.ppo import ValueModel

    critic = ValueModel(_model(family, backbone=True))
    torch.nn.init.normal_(critic.head.weight, std=0.5)
    ids, mask, L = _batch("right")
    out = {}
    for shared in (False, True):
        critic.shared_prefix = shared
        critic.zero_grad(set_to_none=True)
        v = critic(ids, mask, L)
        (v * mask[:, -L:]).sum().backward()
        out[shared] = v.detach(), {n: p.grad.clone() for n, p in critic.named_parameters()
                                   if p.requires_grad}
    real = mask[:, -L:].bool()
    assert float((out[True][0] - out[False][0])[real].abs().max()) <= 1e-5
    for name, g in out[False][1].items():
        assert _close(out[True][1][name], g), name


def test_unsupported_models_take_the_generic_path():
    model = _model("llama", attn="flex_attention")
    assert "flex_attention" in packing.unsupported(model)
    assert packing.forward_path(model, True)["forward_path"] == "generic"
    assert packing.forward_path(_model("llama"), True) == {"forward_path": "shared_prefix"}
    assert packing.forward_path(_model("llama"), False)["forward_path"] == "generic"
    # Qwen2 uses no sliding window by default
    assert packing.unsupported(_model("qwen2"), 10_000) is None
    from transformers import MistralConfig

    cfg = MistralConfig(sliding_window=16)
    cfg._attn_implementation = "sdpa"
    assert "window 16" in packing.unsupported(type("M", (), {"config": cfg})(), 40)


def test_bucketed_order_keeps_groups_whole():
    mask = torch.tensor([[1, 1, 1]] * 2 + [[0, 0, 1]] * 2 + [[0, 1, 1]] * 2)
    assert packing.bucketed_order(mask, 2) == [2, 3, 4, 5, 0, 1]


def test_three_grpo_steps_give_the_same_adapter(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                                tmp_path):
    """The whole loop (rollout, reference pass, bucketed micro-batches, AdamW at the tests' lr
    0.05) on both paths: the adapters' difference is within 1e-5 of how far the adapter moved.
    (Float32 rounding differs between any two groupings of the same sums; AdamW divides each
    gradient by its own magnitude, so elements near 0 carry it into the weights: the plain
    path against itself with micro-batches of 4 instead of 8 differs by 3.7e-6 of the move.)"""
    from safetensors.torch import load_file

    adapters = {}
    for name, shared, lr in (("start", False, 1e-30), ("plain", False, 5e-2),
                             ("shared", True, 5e-2)):
        out = tmp_path / name
        args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", steps=3,
                             micro_batch_size=8, beta=0.04, shared_prefix=shared, lr=lr)
        assert main(["train", "grpo", "--output", str(out), "--quiet", *args]) == 0
        cost = json.loads((out / "cost.json").read_text())
        assert cost["forward_path"] == ("shared_prefix" if shared else "generic")
        adapters[name] = load_file(out / "final" / "adapter_model.safetensors")
    start, plain, shared = adapters["start"], adapters["plain"], adapters["shared"]
    assert set(shared) == set(plain)
    moved = sum(float(((plain[n] - start[n]) ** 2).sum()) for n in plain) ** 0.5
    apart = sum(float(((shared[n] - plain[n]) ** 2).sum()) for n in plain) ** 0.5
    assert moved > 1.0  # the run trained
    assert apart <= 1e-5 * moved, (apart, moved)


def test_gradient_checkpointing_takes_the_packed_forward():
    """One forward with a block mask: activation checkpointing recomputes it unchanged."""
    model = _model("qwen2")
    ids, mask, L = _batch("left", seed=2)
    _, _, g0 = _grads(model, ids, mask, L, shared=False)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, _, g1 = _grads(model, ids, mask, L, shared=True)
    for name in g0:
        assert _close(g1[name], g0[name]), name
