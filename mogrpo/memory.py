"""The memory plan of a policy-training run (docs/scale.md): bytes per process for each
thing the run keeps, from the model's shape and the run's settings. Pure arithmetic, no
torch; the tables in docs/scale.md are `python -m mogrpo.memory`, and the model is
checked against a measured peak by `benchmarks/memory_plan_check.py`.

What mogrpo stores, and so what is counted (B*G = sequences sampled per process, P prompt
and L completion tokens, r the LoRA rank, world the processes sharding under FSDP/ZeRO-3):
- weights: fp32 (master) or bf16 (`policy_dtype`); under bf16 autocast every frozen Linear
  weight is stored in bf16 (models.cast_frozen_linears), so a LoRA base costs 2 bytes per
  Linear parameter whatever `policy_dtype` is;
- trainable tensors, their gradients and AdamW's two moments, in the trainable dtype
  (LoRA adapters stay fp32);
- the reference: nothing with LoRA (the adapter-off policy), a whole frozen copy with full
  fine-tuning (its Linear weights in bf16 under autocast; not sharded);
- sampling (`rollout_engine`): mogrpo's engine (mogrpo/generation.py; unsharded runs) builds
  a snapshot of the decoder layers' Linear weights in the compute dtype (LoRA merged in)
  for the rollout and drops it before the forward/backward; the output head is used as
  stored, except a tied head under autocast, whose bf16 cast is built with the snapshot
  (full fine-tuning) or kept between rollouts (LoRA: the embedding never changes).
  transformers' `generate` (sharded runs, rollout_engine=generate) samples LoRA from the
  merged generation copy (merged_generation): the Linear weights in bf16, the embeddings
  as the policy stores them, and a bf16 output head when it is tied, kept for the run;
- the KV cache of sampling: 2 (K, V) x layers x KV heads x head size x (P + L) x B*G,
  bf16 under autocast; mogrpo's engine keeps a prompt of 128+ tokens once per group
  (B*P + B*G*L tokens);
- with `shared_prefix` (Llama, Mistral, Qwen2), the forward/backward of a micro-batch of m
  sequences encodes each of its prompts once: m/G*P + m*L tokens (P + m*L when m < G);
- activations saved for the backward of one micro-batch: per token and layer, the fp32
  residual stream at the two norms (2 x 4H), the bf16 inputs of the Q/K/V, O, gate/up and
  down projections and SwiGLU's saved tensors (2H + 2H + 2H + 4 x 2I), RoPE'd Q and K and
  SDPA's inputs and output (2 x (2H + 2 KV)) + 2 x (H + 2 KV)): about 20H + 6KV + 8I bytes
  (KV = KV heads x head size); with gradient checkpointing only each layer's fp32 input
  (4H) is kept and one layer is recomputed at a time;
- the log-prob head: bf16 logits of the L + 1 scored positions and the fp32 log-softmax of
  each row chunk kept for the backward (6 bytes x micro-batch x L x V);
- autocast's weight cache: under bf16 autocast, torch keeps the bf16 cast of every fp32
  weight that requires grad for as long as the autocast region lasts (full fine-tuning with
  fp32 weights: 2 bytes per Linear parameter, the tied head included);
- AdamW's step: the foreach implementation allocates one temporary the size of the
  trainable tensors (in their dtype) while it updates them.
Not counted: the reward model (a separate, small model: DeBERTa-v3-base is 184M
parameters, 0.4 GB in bf16), CUDA context and allocator slack (budget 2-4 GB a GPU), and
the Python process itself.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

GiB = 2 ** 30


@dataclass(frozen=True)
class Shape:
    """A decoder's shape (Llama/Qwen2 family: GQA attention, SwiGLU MLP)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # output head shares the input embedding
    qkv_bias: bool = True

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each Linear of one decoder layer (what LoRA adapts: all-linear)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def linear_params(self) -> int:
        """Parameters in Linear layers: the decoder layers' (+ the output head when untied)."""
        per_layer = (sum(a * b for a, b in self.linears())
                     + (self.hidden + 2 * self.kv_dim if self.qkv_bias else 0))
        return self.layers * per_layer + (0 if self.tied else self.vocab * self.hidden)

    def params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.linear_params() + self.vocab * self.hidden + norms

    def lora_params(self, r: int) -> int:
        return self.layers * sum(r * (a + b) for a, b in self.linears())


# The published configs of Qwen2.5-{0.5B,7B,14B}-Instruct (config.json on the hub).
QWEN25 = {
    "0.5b": Shape("Qwen2.5-0.5B", 24, 896, 4864, 14, 2, 151936, tied=True),
    "7b": Shape("Qwen2.5-7B", 28, 3584, 18944, 28, 4, 152064, tied=False),
    "14b": Shape("Qwen2.5-14B", 48, 5120, 13824, 40, 8, 152064, tied=False),
}


# mogrpo's rollout engine keeps prompts of at least this many tokens once per group in its KV
# cache (generation.DecoderWeights reads it from here; shorter ones are copied per sample).
SHARED_PROMPT_MIN = 128


@dataclass(frozen=True)
class Setting:
    """What of a run decides its memory (the config keys of the same names)."""

    lora_r: int = 0
    policy_dtype: str = "fp32"  # fp32 | bf16
    amp: bool = True  # bf16 autocast (precision auto on a GPU, or bf16)
    gradient_checkpointing: bool = False
    micro_batch_size: int = 4
    prompt_tokens: int = 128
    completion_tokens: int = 256
    sequences_sampled: int = 16  # B*G per process per generate call
    world: int = 1  # processes
    sharded: bool = False  # FSDP / ZeRO-3: weights, gradients, optimiser states split over world
    merged_generation: bool = True
    rollout_engine: str = "mogrpo"  # mogrpo | generate (sharded runs always sample with generate)
    critic: bool = False  # PPO: a second backbone (same shape) with LoRA or fully trained
    group_size: int = 1  # G: sequences sharing a prompt (1 = count every prompt per sequence)
    shared_prefix: bool = True  # the training forward encodes a prompt once per micro-batch


def plan(shape: Shape, s: Setting) -> dict[str, float]:
    """Bytes per process of each part (and 'total')."""
    wb = 4 if s.policy_dtype == "fp32" else 2
    frozen_linear_b = 2 if s.amp else wb
    lin, total_p = shape.linear_params(), shape.params()
    other = total_p - lin  # embeddings and norms
    shard = s.world if s.sharded else 1
    engine = "generate" if s.sharded else s.rollout_engine
    layer_lin = lin - (0 if shape.tied else shape.vocab * shape.hidden)
    tied_head_cast = shape.vocab * shape.hidden * 2 if (shape.tied and s.amp) else 0
    out: dict[str, float] = {}
    if s.lora_r > 0:
        t = shape.lora_params(s.lora_r)
        out["weights"] = (lin * frozen_linear_b + other * wb) / shard
        out["trainable (fp32)"] = 4 * t / shard
        out["gradients"] = 4 * t / shard
        out["optimizer (AdamW)"] = 8 * t / shard
        out["reference"] = 0.0
        if engine == "mogrpo":
            out["merged generation copy"] = tied_head_cast  # only the tied head's bf16 cast, kept
            out["rollout snapshot"] = layer_lin * frozen_linear_b
        else:
            out["merged generation copy"] = (lin * frozen_linear_b + other * wb + tied_head_cast
                                             if s.merged_generation else 0.0)
            out["rollout snapshot"] = 0.0
        out["autocast weight cache"] = 0.0
        out["optimizer step temporary"] = 4 * t / shard
    else:
        out["weights"] = total_p * wb / shard
        out["gradients"] = total_p * wb / shard
        out["optimizer (AdamW)"] = 2 * total_p * wb / shard
        out["reference"] = lin * frozen_linear_b + other * wb
        out["merged generation copy"] = 0.0
        # the engine's snapshot in the compute dtype (fp32 storage under autocast: a bf16 copy
        # of the layers and of a tied head; bf16 storage: the fused q/k/v and gate/up copies)
        out["rollout snapshot"] = ((layer_lin * 2 + tied_head_cast if (s.amp or wb == 2)
                                    else layer_lin * 4)
                                   if engine == "mogrpo" else 0.0)
        head = shape.vocab * shape.hidden if shape.tied else 0
        out["autocast weight cache"] = 2 * (lin + head) if (s.amp and wb == 4) else 0.0
        out["optimizer step temporary"] = total_p * wb / shard
    if s.critic:  # the value model: the backbone without the output head, trained like the policy
        c = replace(shape, tied=True)
        c_lin, c_all = c.linear_params(), c.params()
        if s.lora_r > 0:
            t = c.lora_params(s.lora_r)
            out["critic"] = ((c_lin * frozen_linear_b + (c_all - c_lin) * wb) / shard
                             + 16 * t / shard)
        else:
            out["critic"] = 4 * c_all * wb / shard
    T = s.prompt_tokens + s.completion_tokens
    kv_b = 2 if s.amp else 4
    G = max(1, s.group_size)
    kv_tokens = s.sequences_sampled * T
    # a prompt's keys once per group
    if engine == "mogrpo" and G > 1 and s.prompt_tokens >= SHARED_PROMPT_MIN:
        kv_tokens = (-(-s.sequences_sampled // G) * s.prompt_tokens
                     + s.sequences_sampled * s.completion_tokens)
    out["KV cache (sampling)"] = 2 * shape.layers * shape.kv_dim * kv_tokens * kv_b
    tokens = s.micro_batch_size * T
    if s.shared_prefix:  # a prompt once per micro-batch (whole groups, or part of one)
        tokens = (-(-s.micro_batch_size // G) * s.prompt_tokens
                  + s.micro_batch_size * s.completion_tokens)
    per_layer = 20 * shape.hidden + 6 * shape.kv_dim + 8 * shape.intermediate
    if s.gradient_checkpointing:
        out["activations"] = tokens * (shape.layers * 4 * shape.hidden + per_layer)
    else:
        out["activations"] = tokens * shape.layers * per_layer
    out["log-prob head"] = 6 * s.micro_batch_size * (s.completion_tokens + 1) * shape.vocab
    # Three moments that never overlap: sampling (KV cache, the engine's snapshot), the
    # forward/backward inside autocast
    # (activations, log-prob head, autocast's weight cache; gradients filling up) and the
    # optimiser step after it (autocast's cache is gone, the step's temporary is there).
    held = sum(out[k] for k in ("weights", "trainable (fp32)", "optimizer (AdamW)", "reference",
                                "merged generation copy", "critic") if k in out)
    sampling = held + out["KV cache (sampling)"] + out["rollout snapshot"]
    backward = (held + out["gradients"] + out["activations"] + out["log-prob head"]
                + out["autocast weight cache"])
    step = held + out["gradients"] + out["optimizer step temporary"]
    out["total"] = max(sampling, backward, step)
    return out


def largest_micro_batch(shape: Shape, s: Setting, budget_bytes: float, cap: int = 64) -> int:
    """The largest micro-batch (power of two up to `cap`) whose plan fits `budget_bytes`; 0 if
    none."""
    best = 0
    m = 1
    while m <= cap:
        if plan(shape, replace(s, micro_batch_size=m))["total"] <= budget_bytes:
            best = m
        m *= 2
    return best


def gpus_needed(shape: Shape, s: Setting, card_gib: float, reserve_gib: float = 4.0,
                max_gpus: int = 64) -> int:
    """The fewest processes (GPUs) at which one micro-batch of `s` fits a card, sharded (FSDP)
    when s.sharded; 0 if none up to max_gpus."""
    for world in range(1, max_gpus + 1):
        if plan(shape, replace(s, world=world))["total"] <= (card_gib - reserve_gib) * GiB:
            return world
        if not s.sharded:
            return 0
    return 0


def table(shape: Shape, s: Setting) -> str:
    parts = plan(shape, s)
    rows = [f"| {k} | {v / GiB:.2f} |" for k, v in parts.items() if k != "total"]
    return "\n".join(["| part | GiB |", "|---|---|", *rows,
                      f"| **peak** | **{parts['total'] / GiB:.2f}** |"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the memory plan of docs/scale.md")
    ap.add_argument("--card-gib", type=float, nargs="*", default=[80.0, 141.0])
    a = ap.parse_args(argv)
    runs = {"full fine-tuning, fp32 master weights": Setting(lora_r=0),
            "LoRA r=64, bf16 base, gradient checkpointing": Setting(lora_r=64, policy_dtype="bf16",
                                                                   gradient_checkpointing=True)}
    for _size, shape in QWEN25.items():
        print(f"\n### {shape.name}: {shape.params() / 1e9:.2f} B parameters "
              f"({shape.lora_params(64) / 1e6:.1f} M in LoRA r=64)\n")
        for name, s in runs.items():
            print(f"{name}, micro-batch {s.micro_batch_size} x "
                  f"{s.prompt_tokens}+{s.completion_tokens} tokens, "
                  f"{s.sequences_sampled} sequences sampled at once, one process:\n")
            print(table(shape, s) + "\n")
            for card in a.card_gib:
                dp = gpus_needed(shape, s, card)
                fs = gpus_needed(shape, replace(s, sharded=True), card)
                fits = f"one {card:.0f} GB GPU holds it (DDP: any count)" if dp == 1 else \
                    f"does not fit one {card:.0f} GB GPU unsharded"
                mb = largest_micro_batch(shape, replace(s, sharded=fs > 1, world=max(fs, 1)),
                                         (card - 4) * GiB) if fs else 0
                print(f"- {card:.0f} GB: {fits}; FSDP: {fs or 'more than 64'} GPU(s); largest "
                      f"micro-batch there: "
                      f"{mb}{' or more' if mb == 64 else ''}")
            print()


if __name__ == "__main__":
    main()
