"""mogrpo's rollout engine (mogrpo/generation.py) against transformers' `generate`, the
reference path: same ids in fp32 with the same random draws, bounded logits under bf16,
with LoRA and full weights, left-padded prompts of mixed lengths, EOS inside the budget
or not; its inverse-CDF sampler against the distribution by hand."""

from __future__ import annotations

import pytest
import torch

from mogrpo import generation
from mogrpo.models import load_policy
from mogrpo.rollout import chat_texts, generate_rollout

PROMPTS = ["how do i bake bread", "what is it",
           "why can you make a cake with water and flour today please"]


def _model(folder, lora: bool):
    torch.manual_seed(0)
    model, tok = load_policy(str(folder), lora_r=4 if lora else 0, lora_alpha=8)
    if lora:  # LoRA starts as a no-op (B = 0): give the adapters weight, so merging matters
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return model.eval(), tok


def _encode(tok):
    enc = tok(chat_texts(tok, PROMPTS), return_tensors="pt", padding=True, add_special_tokens=False,
              return_token_type_ids=False)
    lengths = enc["attention_mask"].sum(1)
    # mixed lengths, left padding
    assert tok.padding_side == "left" and len(set(lengths.tolist())) == 3
    return enc


def _generate(model, enc, G, L, eos, pad):
    torch.manual_seed(7)
    out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=L, num_return_sequences=G,
                         pad_token_id=pad, eos_token_id=sorted(eos))
    return out[:, enc["input_ids"].shape[1]:]


def _engine(model, enc, G, L, eos, pad, dtype=torch.float32):
    torch.manual_seed(7)
    weights = generation.DecoderWeights(model, dtype)
    return generation.sample(weights, enc["input_ids"], enc["attention_mask"], repeat=G,
                             max_new_tokens=L, eos_ids=eos, pad_id=pad, draws="multinomial")


@pytest.fixture(params=["llama-lora", "llama-full", "qwen2-lora", "qwen2-full"])
def policy(request, tiny_policy_dir, tiny_qwen2_dir):
    arch, kind = request.param.split("-")
    return _model(tiny_policy_dir if arch == "llama" else tiny_qwen2_dir, kind == "lora")


@pytest.fixture(params=["prompt-per-row", "prompt-per-group"])
def cache_layout(request, monkeypatch):
    """Both KV-cache layouts of the engine: prompts copied into every sample's row, and kept
    (and attended) once per group, which the engine picks for prompts of 128+ tokens."""
    monkeypatch.setattr(generation.DecoderWeights, "SHARED_PROMPT_MIN",
                        10 ** 9 if request.param == "prompt-per-row" else 0)
    return request.param


@torch.no_grad()
def test_same_ids_as_generate_in_fp32(policy, cache_layout):
    """With generate's own draws (`multinomial`) the engine returns generate's ids exactly:
    G=3 samples of 3 left-padded prompts, first running to the budget, then with an EOS the
    samples reach inside it (some rows end early and are padded, the rest continue)."""
    model, tok = policy
    enc = _encode(tok)
    G, L, pad = 3, 12, tok.pad_token_id
    eos = {tok.eos_token_id}
    ref = _generate(model, enc, G, L, eos, pad)
    ours = _engine(model, enc, G, L, eos, pad)
    assert torch.equal(ours, ref)
    # Make a token the first rows sample mid-way an EOS: those rows must now stop there.
    stop = int(ref[0, 4])
    eos2 = eos | {stop}
    ref2 = _generate(model, enc, G, L, eos2, pad)
    ours2 = _engine(model, enc, G, L, eos2, pad)
    assert torch.equal(ours2, ref2)
    ended = torch.isin(ref2, torch.tensor(sorted(eos2))).any(1)
    assert ended.any() and ended[0], "the chosen EOS must end row 0 inside the budget"
    first = torch.isin(ref2[0], torch.tensor(sorted(eos2))).nonzero()[0, 0]
    assert first < ref2.shape[1] - 1 and (ours2[0, first + 1:] == pad).all()


@torch.no_grad()
def test_logits_bounded_under_bf16(policy, cache_layout):
    """Under bf16 autocast (fused bf16 matmuls, LoRA merged into bf16 weights) the engine's
    logits along a completion stay within bf16 rounding of the training forward's; fp32:
    within 1e-4. Teacher-forced, so one rounding difference cannot change what follows.
    Measured (max |difference| / max |logit|): fp32 2e-7 to 1.3e-6; bf16 full weights 5e-3,
    bf16 LoRA 3-4e-2 (the training forward rounds the base output and the adapter's x A B
    to bf16 separately, the engine rounds W + B A once; these adapters are large,
    B ~ N(0, 0.5))."""
    model, tok = policy
    enc = _encode(tok)
    G, L = 2, 10
    comp = _generate(model, enc, G, L, {-1}, tok.pad_token_id)  # no EOS: every row runs L tokens
    ids = torch.cat([enc["input_ids"].repeat_interleave(G, 0), comp], 1)
    mask = torch.cat([enc["attention_mask"].repeat_interleave(G, 0), torch.ones_like(comp)], 1)
    for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 0.08)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            ref = model(input_ids=ids, attention_mask=mask,
                        position_ids=position_ids).logits.float()
            # [N, L, V]: the logits each completion token was drawn from
            ref = ref[:, enc["input_ids"].shape[1] - 1:-1]
            w = generation.DecoderWeights(model, generation.compute_dtype(model))
        assert w.dtype == dtype
        got = _teacher_forced(w, enc, comp, G)
        scale = ref.abs().max()
        assert (got - ref).abs().max() <= bound * scale, (dtype, float((got - ref).abs().max()),
                                                          float(scale))


def _teacher_forced(w, enc, comp, G):
    """The engine's logits [N, L, V] when it is fed `comp` [N, L] one token at a time."""
    P = enc["input_ids"].shape[1]
    N, L = comp.shape
    cache = w.new_cache(N // G, G, P, L, "cpu")
    bias = torch.zeros(N, 1, 1, P + L)
    bias[:, 0, 0, :P].masked_fill_(~enc["attention_mask"].bool().repeat_interleave(G, 0),
                                   float("-inf"))
    position = enc["attention_mask"].sum(-1).repeat_interleave(G, 0)
    out = [w.logits(w.prefill(enc["input_ids"], enc["attention_mask"],
                              cache)).repeat_interleave(G, 0)]
    for s in range(L - 1):
        out.append(w.logits(w.step(comp[:, s], position + s, s, cache, bias[..., :P + s + 1])))
    return torch.stack(out, 1).float()


def test_inverse_cdf_by_hand():
    """Token i is returned for u in (c[i-1], c[i]] of the cumulative mass; zero-probability
    tokens never, even at u = 1 or just above a boundary."""
    # exact in binary: c = 0, .25, .25, .75, 1, 1
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25, 0.0]] * 6)
    u = torch.tensor([1e-12, 0.25, 0.25 + 1e-9, 0.75, 0.75 + 1e-9, 1.0], dtype=torch.float64)
    assert generation.inverse_cdf(probs, u).tolist() == [1, 1, 3, 3, 4, 4]
    unnormalised = probs * 3  # the total need not be 1
    assert generation.inverse_cdf(unnormalised, u).tolist() == [1, 1, 3, 3, 4, 4]


def test_engine_draws_follow_the_distribution():
    """200k draws of next_tokens from fixed logits: every token's frequency is within 5
    standard errors of softmax(logits / T), top-p drops exactly the tail it should."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    torch.manual_seed(0)
    n = 200_000
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.8)):
        p = torch.softmax(logits.double() / temperature, -1)
        if top_p < 1:  # the smallest set of most likely tokens whose mass reaches top_p
            assert p[0] < top_p <= p[:2].sum()  # 0.64 < 0.8 <= 0.64 + 0.23: the two most likely
            p = torch.cat([p[:2], torch.zeros(3, dtype=p.dtype)])
            p = p / p.sum()
        got = generation.next_tokens(logits.expand(n, -1).clone(), greedy=False,
                                     temperature=temperature, top_p=top_p)
        freq = torch.bincount(got, minlength=5).double() / n
        se = (p * (1 - p) / n).sqrt().clamp(min=1e-9)
        assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (temperature, top_p, freq, p)


@torch.no_grad()
def test_generate_rollout_engines_agree_on_structure(tiny_policy_dir):
    """Through generate_rollout (chat template, chunks, guided openers): both engines give the
    same prompts, guided openers and masks' invariants; auto picks mogrpo's for Llama."""
    model, tok = _model(tiny_policy_dir, lora=True)
    kinds = ["harmful", "benign", "benign"]
    out = {e: generate_rollout(model, tok, PROMPTS, kinds, group_size=3, max_new_tokens=10, seed=1,
                               guided=1, chunk_prompts=2, openers=("sorry cannot help",), engine=e)
           for e in ("mogrpo", "generate", "auto")}
    a, b = out["mogrpo"], out["generate"]
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.guided, b.guided)
    opener = tok("sorry cannot help", add_special_tokens=False)["input_ids"]
    for ro in (a, b):
        assert (ro.completion_ids[ro.guided][:, :len(opener)] == torch.tensor(opener)).all()
        assert (ro.completion_mask.sum(1) >= 1).all()
    assert torch.equal(out["auto"].completion_ids, a.completion_ids)  # seeded: auto = mogrpo here


def test_unsupported_models_use_generate(tiny_decoder_dir, tmp_path):
    """A GPT-2 policy: auto falls back to generate; asking for mogrpo's engine says why not."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mogrpo.models import load_tokenizer

    tok = load_tokenizer(str(tiny_decoder_dir))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                                       n_positions=128))
    assert "architecture 'gpt2'" in generation.unsupported(model)
    ro = generate_rollout(model, tok, PROMPTS[:1], ["benign"], group_size=2, max_new_tokens=4)
    assert ro.completion_ids.shape[0] == 2
    with pytest.raises(ValueError,
                       match="mogrpo rollout engine cannot sample.*gpt2.*rollout_engine=auto"):
        generate_rollout(model, tok, PROMPTS[:1], ["benign"], group_size=2, max_new_tokens=4,
                         engine="mogrpo")
    with pytest.raises(ValueError, match="rollout engine 'vllm'"):
        generate_rollout(model, tok, PROMPTS[:1], ["benign"], group_size=2, max_new_tokens=4,
                         engine="vllm")


@torch.no_grad()
def test_generate_path_ignores_the_checkpoints_generation_config(tiny_policy_dir):
    """A checkpoint's repetition penalty or top-k would make generate sample another
    distribution than the one the loss differentiates: the reference path switches them off."""
    model, tok = _model(tiny_policy_dir, lora=False)
    plain = generate_rollout(model, tok, PROMPTS, ["benign"] * 3, group_size=2, max_new_tokens=8,
                             engine="generate")
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.top_k = 2
    model.generation_config.no_repeat_ngram_size = 1
    again = generate_rollout(model, tok, PROMPTS, ["benign"] * 3, group_size=2, max_new_tokens=8,
                             engine="generate")
    assert torch.equal(plain.completion_ids, again.completion_ids)


def test_snapshot_shares_what_it_can_and_keeps_while_unchanged(tiny_qwen2_dir):
    """Embeddings and norms are the policy's tensors; an fp32 layer used in fp32 is not
    copied; inside keep_weights one snapshot serves until a parameter changes in place."""
    model, tok = _model(tiny_qwen2_dir, lora=False)
    w = generation.DecoderWeights(model, torch.float32)
    body = model.model
    assert w.embed.data_ptr() == body.embed_tokens.weight.data_ptr()
    assert w.layers[0].ln1.data_ptr() == body.layers[0].input_layernorm.weight.data_ptr()
    assert w.layers[0].down.data_ptr() == body.layers[0].mlp.down_proj.weight.data_ptr()
    assert w.head.data_ptr() == body.embed_tokens.weight.data_ptr()  # tied head, fp32: no copy
    assert generation.snapshot(model,
                               torch.float32) is not generation.snapshot(model, torch.float32)
    with generation.keep_weights(model):
        first = generation.snapshot(model, torch.float32)
        assert generation.snapshot(model, torch.float32) is first
        with torch.no_grad():
            body.layers[0].self_attn.q_proj.weight.add_(1.0)
        second = generation.snapshot(model, torch.float32)
        assert second is not first and not torch.equal(second.layers[0].qkv, first.layers[0].qkv)
    bf = generation.DecoderWeights(model, torch.bfloat16)
    assert bf.head.dtype == torch.bfloat16 and bf.embed.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_token_logprobs_match_autograd(dtype):
    """_TokenLogProbs (forward and hand-written backward, chunk by chunk) equals autograd
    through log_softmax + gather, with a temperature, for fp32 and bf16 logits; the
    entropy it returns is the plain one."""
    from mogrpo.rollout import _TokenLogProbs

    torch.manual_seed(0)
    logits = (torch.randn(5, 7, 11) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 11, (5, 7))
    weights = torch.randn(5, 7)
    logp, ent = _TokenLogProbs.apply(logits, targets, 0.7, 2, True)
    (logp * weights).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    lsm = torch.log_softmax(logits.float() / 0.7, -1)
    ref = lsm.gather(-1, targets[..., None]).squeeze(-1)
    (ref * weights).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(logp, ref, atol=tol) and got.dtype == dtype
    assert torch.allclose(got.float(), logits.grad.float(), atol=tol)
    assert torch.allclose(ent, -(lsm.exp() * lsm).sum(-1), atol=1e-5)
