"""mogrpo's sampling engine for Llama-family policies (Llama, Mistral, Qwen2): the decoding
loop behind `rollout.generate_rollout`.

Why not `model.generate`. Decoding one token for a group of 16 sequences of a 135M model
is ~4 GFLOP, a few tens of milliseconds of matmuls on 2 CPU cores; `generate` spends
several times that per step in Python and small ops (per-layer cache objects, mask
building, logits processors, PEFT's adapter dispatch), and it prefills every prompt G
times. A rollout engine (vLLM, SGLang) removes that overhead on GPUs but is not a
dependency mogrpo can assume (CPU-only installs, no network), so this module is a small
one, written for mogrpo, that does only what a rollout needs:

- **Prefill once per group, attend once per group.** Each prompt is run through the model
  once and its keys and values are kept once, not once per sample: in every decoding step
  the G samples' queries read their prompt's keys together, as the rows of one matmul
  (cascade attention, as Hydragen, arXiv 2402.05099), and their own tokens' keys apart.
  With prompts of hundreds of tokens this is most of a step's attention.
- **Static KV cache.** Preallocated buffers per layer in the compute dtype: the prompts'
  keys and values [R, KV, P, d] and the samples' own [N, KV, L, d]; each step writes one
  column. No per-step allocation or concatenation.
- **Fused weights.** A snapshot of the weights the policy applies *now* (LoRA adapters
  merged in, as PEFT's `get_delta_weight` gives them), cast once to the compute dtype,
  with q/k/v and gate/up each fused into one matmul: 4 matmuls per layer instead of 7
  (LoRA: 21). Embeddings and norm weights are the policy's own tensors (shared, not
  copied); the snapshot is dropped when the rollout ends, so it never coexists with the
  backward's activations.
- **One fused step.** Rotary embedding by one roll and two multiplies for q and k together,
  grouped-query attention without repeating keys (a group's query heads attend as rows of
  one KV head), `rms_norm`, and sampling (temperature, top-p, `multinomial`) on the
  logits of the last position only.

What it computes is what `model.generate` computes with the same settings: the same
sampling distribution (softmax(logits / temperature), nucleus top-p), the same random
draws in the same order (one `multinomial` over all N rows per step, so a seeded rollout
gives the same ids as `generate` up to floating-point ties), the same stopping (a row
ends at its first EOS and is padded after; the loop ends when every row has ended or at
max_new_tokens). It differs only in rounding: fused matmuls and `rms_norm` sum in another
order (fp32: ~1e-6 in the logits; bf16 compute: bf16 rounding, as in any engine with its
own kernels). tests/test_generation.py holds both paths to that. Unlike `generate`, it
ignores the model's `generation_config` (a Qwen2.5 checkpoint's repetition_penalty=1.05
and top_k=20): a rollout samples exactly the distribution the policy-gradient loss
differentiates, so `rollout.generate_rollout` passes the same explicit settings to both.

Architectures beyond this family, DoRA or bias-carrying adapters, sliding-window attention
and sharded (FSDP/ZeRO-3) runs use `model.generate`; `unsupported(model)` says why.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mogrpo.memory import SHARED_PROMPT_MIN
from mogrpo.sampling import inverse_cdf, next_tokens  # noqa: F401  (inverse_cdf: re-exported)
from mogrpo.tracking import DivergedError

ARCHITECTURES = ("llama", "mistral", "qwen2")


def _base(model):
    """The transformers model under a PEFT wrapper (the adapter layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(model) -> str | None:
    """Why this engine cannot sample from `model` (None when it can)."""
    base = _base(model)
    cfg = getattr(base, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"architecture {kind!r} (supported: {', '.join(ARCHITECTURES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return "an MLP other than SwiGLU without bias"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    window = getattr(cfg, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(cfg, "layer_types", None) or []) or (
        kind == "mistral" and window is not None)
    if sliding:
        return f"sliding-window attention (window {window})"
    for name, m in base.named_modules():
        if hasattr(m, "lora_A"):
            if not isinstance(getattr(m, "base_layer", None), torch.nn.Linear):
                return f"a LoRA adapter on {name}, which is not a Linear layer"
            if any(getattr(m, "use_dora", {}).values()) or any(getattr(m, "lora_bias",
                                                                       {}).values()):
                return f"a DoRA or bias-carrying LoRA adapter on {name}"
        elif hasattr(m, "modules_to_save"):
            return f"a PEFT modules_to_save copy of {name}"
    if any(type(p).__name__ == "DTensor" for p in base.parameters()):
        return "sharded (DTensor) weights"
    return None


def write_linear(module: torch.nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Write the weight a Linear layer applies now into `out` (any dtype; one rounding): for
    a PEFT LoRA layer, its base weight plus every active adapter's delta (PEFT's own
    `get_delta_weight`)."""
    base = getattr(module, "base_layer", None)
    out.copy_((base if base is not None else module).weight.detach())
    if base is not None and not module.merged and not module.disable_adapters:
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                # computed in fp32, rounded once
                out.add_(module.get_delta_weight(adapter).detach())
    return out


def _bias(module: torch.nn.Module) -> torch.Tensor | None:
    return getattr(getattr(module, "base_layer", module), "bias", None)


def _fuse(modules: list, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight [sum out, in] and bias (None when no part has one) of Linear layers applied to
    the same input, in `dtype`. A single plain layer already in `dtype` gives its own
    tensors (no copy); a frozen one in another dtype is cast once and the cast is kept on
    the layer while its weight is unchanged (a tied fp32 head: 56 MB, cast per rollout)."""
    if len(modules) == 1 and getattr(modules[0], "base_layer", None) is None:
        m = modules[0]
        w, b = m.weight.detach(), (None if m.bias is None else m.bias.detach().to(dtype))
        if w.dtype == dtype:
            return w, b
        if not m.weight.requires_grad:
            kept = getattr(m, "_mogrpo_cast", None)
            key = (m.weight.data_ptr(), m.weight._version, dtype)
            if kept is None or kept[0] != key:
                kept = (key, w.to(dtype))
                m._mogrpo_cast = kept
            return kept[1], b
    rows = [getattr(m, "base_layer", m).weight.shape[0] for m in modules]
    first = getattr(modules[0], "base_layer", modules[0]).weight
    w = torch.empty(sum(rows), first.shape[1], dtype=dtype, device=first.device)
    for m, part in zip(modules, w.split(rows)):
        write_linear(m, part)
    biases = [_bias(m) for m in modules]
    if all(b is None for b in biases):
        return w, None
    return w, torch.cat([(b.detach() if b is not None else torch.zeros(r,
                                                                       device=w.device)).to(dtype)
                         for b, r in zip(biases, rows)])


@dataclass
class _Layer:
    ln1: torch.Tensor  # [h] input norm weight (the policy's tensor)
    qkv: torch.Tensor  # [(H + 2 KV) d, h]
    qkv_b: torch.Tensor | None
    o: torch.Tensor  # [h, H d]
    o_b: torch.Tensor | None
    ln2: torch.Tensor  # [h]
    gate_up: torch.Tensor  # [2 I, h]
    down: torch.Tensor  # [h, I]


class DecoderWeights:
    """A snapshot of a Llama-family policy's weights for decoding (see the module docstring):
    fused Linear weights in `dtype`, the policy's own embedding, norms and rotary module."""

    def __init__(self, model, dtype: torch.dtype):
        base = _base(model)
        cfg, body = base.config, base.model
        attn = body.layers[0].self_attn
        self.dtype = dtype
        self.heads, self.kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                    cfg.num_key_value_heads, attn.head_dim)
        self.scale = attn.scaling
        self.eps = cfg.rms_norm_eps
        self.embed = body.embed_tokens.weight.detach()  # [V, h]
        self.rotary = body.rotary_emb
        self.norm = body.norm.weight.detach()
        self.layers = []
        with torch.no_grad():
            for layer in body.layers:
                a, m = layer.self_attn, layer.mlp
                qkv, qkv_b = _fuse([a.q_proj, a.k_proj, a.v_proj], dtype)
                o, o_b = _fuse([a.o_proj], dtype)
                gate_up, _ = _fuse([m.gate_proj, m.up_proj], dtype)
                down, _ = _fuse([m.down_proj], dtype)
                self.layers.append(_Layer(layer.input_layernorm.weight.detach(), qkv, qkv_b, o, o_b,
                                          layer.post_attention_layernorm.weight.detach(), gate_up,
                                          down))
            head, head_b = _fuse([base.get_output_embeddings()], dtype)
        self.head, self.head_b = head, head_b  # [V, h]

    # ---- pieces of the forward

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """RMSNorm as Llama's: statistics in fp32, the result back in x's dtype, times w."""
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _rope(self, x: torch.Tensor, position_ids: torch.Tensor):
        """(cos, signed sin) [R, S, 1, d]: rotate_half(x) * sin == roll(x, d/2) * signed sin."""
        cos, sin = self.rotary(x, position_ids)  # [R, S, d], in x's dtype
        half = self.head_dim // 2
        sign = torch.ones(self.head_dim, dtype=sin.dtype, device=sin.device)
        sign[:half] = -1
        return cos[:, :, None], (sin * sign)[:, :, None]

    def _qkv(self, layer: _Layer, x: torch.Tensor, cos, sin):
        """q [R, S, H, d] and k, v [R, S, KV, d] in the compute dtype, rotary applied to q, k."""
        R, S, _ = x.shape
        H, KV, d = self.heads, self.kv_heads, self.head_dim
        # [R, S, (H + 2 KV) d]
        qkv = F.linear(self._rms(x, layer.ln1).to(self.dtype), layer.qkv, layer.qkv_b)
        qk = qkv[..., :(H + KV) * d].view(R, S, H + KV, d)
        # rotary in cos/sin's dtype, as Llama's
        qk = (qk * cos + qk.roll(d // 2, dims=-1) * sin).to(self.dtype)
        return qk[:, :, :H], qk[:, :, H:], qkv[..., (H + KV) * d:].view(R, S, KV, d)

    def _mlp_out(self, layer: _Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual stream after the attention output `attn` [R, S, H d] and the MLP."""
        x = x + F.linear(attn, layer.o, layer.o_b)
        gate, up = F.linear(self._rms(x, layer.ln2).to(self.dtype), layer.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [R, V] of the hidden states x [R, h], in the compute dtype (generate casts
        them to fp32 before its processors; next_tokens does the same)."""
        return F.linear(self._rms(x, self.norm).to(self.dtype), self.head, self.head_b)

    # Prompts at least this long are kept and read once per group (`new_cache`); shorter ones
    # are copied into every sample's row (one attention matmul per layer and step, fewer small
    # ops). Measured on 2 cores, layouts interleaved: 480-token prompts x G = 8, 5.52 s per
    # rollout copied, 3.80 s per group; 50-token prompts x G = 4, 3.04 s both ways. Short
    # prompts gain nothing measurable, so they keep the simpler layout.
    SHARED_PROMPT_MIN = SHARED_PROMPT_MIN  # 128 (mogrpo/memory.py counts the cache with it)

    def new_cache(self, R: int, repeat: int, P: int, L: int, device) -> list:
        """Per layer (prompt keys, prompt values, the samples' keys, values), in the compute
        dtype: with long prompts and groups, the prompts' [R, KV, P, d] (one copy per group)
        and the samples' own [R * repeat, KV, L, d]; else (None, None) and every sample's whole
        [R * repeat, KV, P + L, d], its prompt copied in."""
        def buf(n, t):
            return torch.empty(n, self.kv_heads, t, self.head_dim, dtype=self.dtype, device=device)
        if repeat > 1 and P >= self.SHARED_PROMPT_MIN:
            return [(buf(R, P), buf(R, P), buf(R * repeat, L), buf(R * repeat,
                                                                   L)) for _ in self.layers]
        return [(None, None, buf(R * repeat, P + L), buf(R * repeat, P + L)) for _ in self.layers]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: list) -> torch.Tensor:
        """Run the R left-padded prompts [R, P] once; write their keys/values into the prompt
        part of `cache` (`new_cache`); last hidden [R, h]."""
        R, P = input_ids.shape
        mask = attention_mask.bool()
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        x = F.embedding(input_ids, self.embed)  # [R, P, h]
        cos, sin = self._rope(x, position_ids)
        causal = torch.ones(P, P, dtype=torch.bool, device=x.device).tril()
        # A padding position attends only to itself, so no row is all-masked (NaN-free) and no
        # real token ever sees a pad.
        allowed = (causal & mask[:, None, :]) | torch.eye(P, dtype=torch.bool, device=x.device)
        allowed = allowed[:, None]  # [R, 1, P, P]
        for layer, (pk, pv, sk, sv) in zip(self.layers, cache):
            q, k, v = self._qkv(layer, x, cos, sin)
            if pk is not None:
                pk.copy_(k.transpose(1, 2))
                pv.copy_(v.transpose(1, 2))
            else:  # into the first P columns of all rows of each prompt's group
                N = sk.shape[0]
                sk.view(R, N // R, *sk.shape[1:])[:, :, :, :P] = k.transpose(1, 2)[:, None]
                sv.view(R, N // R, *sv.shape[1:])[:, :, :, :P] = v.transpose(1, 2)[:, None]
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2),
                                                  attn_mask=allowed, scale=self.scale,
                                                  enable_gqa=True)
            x = self._mlp_out(layer, x, attn.transpose(1, 2).reshape(R, P, -1))
        return x[:, -1]

    def step(self, ids: torch.Tensor, position: torch.Tensor, column: int, cache: list,
             bias: torch.Tensor) -> torch.Tensor:
        """One decoding step: tokens ids [N] at positions [N], the `column`-th new token of
        every row; `bias` [N, 1, 1, P + column + 1] is 0 on the keys they may attend to (the
        prompt's, then their own) and -inf on padding; last hidden [N, h]."""
        N = ids.shape[0]
        H, KV, d = self.heads, self.kv_heads, self.head_dim
        g, t = H // KV, column + 1
        x = F.embedding(ids[:, None], self.embed)  # [N, 1, h]
        cos, sin = self._rope(x, position[:, None])
        for layer, (pk, pv, sk, sv) in zip(self.layers, cache):
            if pk is None:  # every row holds its prompt: one attention over its P + t keys
                x = self._step_whole(layer, x, cos, sin, sk, sv, bias)
                continue
            R, P = pk.shape[0], pk.shape[2]
            G = N // R
            q, k, v = self._qkv(layer, x, cos, sin)  # q [N, 1, H, d]; k, v [N, 1, KV, d]
            sk[:, :, column] = k[:, 0]
            sv[:, :, column] = v[:, 0]
            # Grouped-query attention without repeating keys: the g = H / KV query heads of a KV
            # head are the rows of one [g, d] block (two batched matmuls and a softmax: for one
            # query position ~2x faster on CPU than scaled_dot_product_attention's kernel), and
            # against the prompt the G samples of a group are rows of one block too, so each
            # prompt key is read once per group. Scores in fp32, as eager attention computes them.
            qg = q.view(R, G, KV, g, d).transpose(1, 2).reshape(R * KV, G * g, d)
            s_prompt = torch.bmm(qg, pk.view(R * KV, P, d).transpose(1, 2))  # [R KV, G g, P]
            s_prompt = s_prompt.view(R, KV, G, g, P).transpose(1, 2).reshape(N, KV, g, P)
            s_own = torch.bmm(q.reshape(N * KV, g, d), sk[:, :, :t].reshape(N * KV, t,
                                                                            d).transpose(1, 2))
            scores = torch.cat([s_prompt, s_own.view(N, KV, g, t)], -1)  # [N, KV, g, P + t]
            probs = (scores.float() * self.scale + bias).softmax(-1).to(self.dtype)
            p_prompt = probs[..., :P].reshape(R, G, KV, g, P).transpose(1, 2).reshape(R * KV, G * g,
                                                                                      P)
            a_prompt = torch.bmm(p_prompt, pv.view(R * KV, P, d)).view(R, KV, G, g, d).transpose(1,
                                                                                                 2)
            a_own = torch.bmm(probs[..., P:].reshape(N * KV, g, t), sv[:, :, :t].reshape(N * KV, t,
                                                                                         d))
            attn = a_prompt.reshape(N, KV, g, d) + a_own.view(N, KV, g, d)
            x = self._mlp_out(layer, x, attn.reshape(N, 1, H * d))
        return x[:, 0]

    def _step_whole(self, layer: _Layer, x, cos, sin, ck, cv, bias) -> torch.Tensor:
        """One layer of a decoding step on the per-row cache [N, KV, P + L, d]."""
        N = x.shape[0]
        H, KV, d = self.heads, self.kv_heads, self.head_dim
        t = bias.shape[-1]  # keys so far, this token's included
        q, k, v = self._qkv(layer, x, cos, sin)
        ck[:, :, t - 1] = k[:, 0]
        cv[:, :, t - 1] = v[:, 0]
        keys = ck[:, :, :t].reshape(N * KV, t, d)
        scores = torch.bmm(q.reshape(N * KV, H // KV, d), keys.transpose(1, 2)).view(N, KV, H // KV,
                                                                                     t)
        probs = (scores.float() * self.scale + bias).softmax(-1).to(self.dtype)
        attn = torch.bmm(probs.view(N * KV, H // KV, t), cv[:, :, :t].reshape(N * KV, t, d))
        return self._mlp_out(layer, x, attn.view(N, 1, H * d))


def compute_dtype(model) -> torch.dtype:
    """The dtype `generate` would compute matmuls in here: the autocast dtype when autocast
    is on for the model's device, else the model's embedding dtype."""
    weight = _base(model).get_input_embeddings().weight
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


@torch.no_grad()
def sample(weights: DecoderWeights, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
           repeat: int, max_new_tokens: int, eos_ids: set[int], pad_id: int, greedy: bool = False,
           temperature: float = 1.0, top_p: float = 1.0,
           draws: str = "inverse_cdf") -> torch.Tensor:
    """New tokens [R * repeat, L'] for R left-padded prompts [R, P] (row r * repeat + j is
    sample j of prompt r), L' <= max_new_tokens: pad after a row's first EOS; stops when
    every row has ended. Seed the global generator before calling for reproducible draws."""
    R, P = input_ids.shape
    N, T = R * repeat, P + max_new_tokens
    device = input_ids.device
    cache = weights.new_cache(R, repeat, P, max_new_tokens, device)
    # 0 on visible keys, -inf on the prompts' left padding
    bias = torch.zeros(N, 1, 1, T, device=device)
    bias[:, 0, 0, :P].masked_fill_(~attention_mask.bool().repeat_interleave(repeat, 0),
                                   float("-inf"))
    # [N]: the next token's position
    position = attention_mask.long().sum(-1).repeat_interleave(repeat, 0)
    eos = torch.tensor(sorted(eos_ids), device=device)
    out = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    cdf = None if greedy or draws != "inverse_cdf" else torch.empty(
        N, weights.head.shape[0], dtype=torch.float64, device=device)
    sampling = dict(greedy=greedy, temperature=temperature, top_p=top_p, draws=draws, cdf=cdf)
    with torch.autocast(device.type, enabled=False):  # dtypes are explicit here
        logits = weights.logits(weights.prefill(input_ids, attention_mask, cache))  # [R, V]
        # [N, V]: the group's samples share the prefill
        logits = logits.repeat_interleave(repeat, 0)
        steps, finite = 0, torch.ones((), dtype=torch.bool, device=device)
        for s in range(max_new_tokens):
            finite &= torch.isfinite(logits).all()  # read once, after the loop: no sync per step
            tok = torch.where(done, pad_id, next_tokens(logits, **sampling))
            out[:, s] = tok
            done |= torch.isin(tok, eos)
            steps = s + 1
            if s + 1 == max_new_tokens or bool(done.all()):
                break
            visible = bias[..., :P + s + 1]
            logits = weights.logits(weights.step(tok, position + s, s, cache, visible))
    if not bool(finite):
        raise DivergedError("the policy's logits are not finite (NaN or inf): its weights diverged")
    return out[:, :steps]


# id(model) -> (signature, DecoderWeights) inside `keep_weights`
_KEPT: dict[int, tuple | None] = {}


@contextmanager
def keep_weights(model):
    """Within the block, rollouts from `model` reuse one weight snapshot for as long as none
    of its parameters changes (their version counters) and the compute dtype is the same:
    evaluation samples many batches from one model. Outside such a block every rollout
    builds its snapshot and drops it at the end (training: the snapshot must not outlive the
    rollout, and the weights change every step)."""
    key = id(model)
    _KEPT[key] = None
    try:
        yield
    finally:
        _KEPT.pop(key, None)


def snapshot(model, dtype: torch.dtype) -> DecoderWeights:
    """The model's DecoderWeights in `dtype` (kept and reused inside `keep_weights`)."""
    key = id(model)
    if key not in _KEPT:
        return DecoderWeights(model, dtype)
    signature = (dtype, tuple(p._version for p in model.parameters()))
    kept = _KEPT[key]
    if kept is None or kept[0] != signature:
        kept = _KEPT[key] = (signature, DecoderWeights(model, dtype))
    return kept[1]
