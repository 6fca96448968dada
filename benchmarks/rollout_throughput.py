"""Rollout generation throughput: mogrpo's `generate_rollout` against a bare `model.generate`.

Same policy object as the trainers hold it (SmolLM2-135M-Instruct with LoRA r=16, frozen
weights stored in the autocast dtype), same batch (B prompts x G samples), same sampling
settings. mogrpo samples as its trainers do: `generate_rollout` with the default engine
(mogrpo/generation.py: one prefill per group, static KV cache, LoRA merged into a fused
snapshot, inverse-CDF draws), including the chat template, tokenising, per-chunk seeding,
the completion mask and decoding. The peer is what a user would write: `model.generate`
on the same model with `num_return_sequences=G`, KV cache on, pre-tokenised inputs, raw
ids out. A second peer, `generate` on a copy with the adapters merged in
(models.MergedGenerationCopy, what mogrpo's trainers sampled from before the engine),
shows how much comes from merging and how much from the decoding loop. The engines draw
different random numbers, so the tokens differ; the work is the same (every row of a
random-temperature 1 rollout of 48 tokens runs to the budget, which the JSON's token
counts show). Alternates the three after a warm-up; reports medians of tokens per second
(generated positions, B*G*L) and the ratios.

    python benchmarks/rollout_throughput.py [--prompts 4] [--group-size 4] [--max-new-tokens 48]
                                            [--policy random:qwen2.5-7b] [--device cuda]

Writes benchmarks/results/rollout_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="builtin:smollm2-135m-instruct",
                    help="a policy or random:qwen2.5-0.5b|7b|14b (benchmarks/random_models.py)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--prompts", type=int, default=4, help="B prompts (the first training prompts)")
    ap.add_argument("--group-size", type=int, default=4, help="G samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out",
                    default=str(Path(__file__).parent / "results" / "rollout_throughput.json"))
    args = ap.parse_args()

    from random_models import resolve

    from mogrpo.data.prompts import load_prompt_set
    from mogrpo.models import MergedGenerationCopy, autocast_dtype, cast_frozen_linears, load_policy
    from mogrpo.rollout import _eos_ids, chat_texts, generate_rollout

    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    args.policy = resolve(args.policy, os.environ.get("MOGRPO_CACHE"))
    amp = autocast_dtype(device, args.precision)
    torch.manual_seed(0)
    model, tok = load_policy(args.policy, lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    model.to(device).eval()
    cast_frozen_linears(model, amp)
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    prompts = load_prompt_set("default", None, "train")[: args.prompts]
    texts, kinds = [p.text for p in prompts], [p.kind for p in prompts]
    G, L = args.group_size, args.max_new_tokens
    enc = tok(chat_texts(tok, texts), return_tensors="pt", padding=True,
              add_special_tokens=False).to(device)
    eos = sorted(_eos_ids(model, tok))

    def ours() -> tuple[float, int]:
        t = time.perf_counter()
        with ctx():
            ro = generate_rollout(model, tok, texts, kinds, group_size=G, max_new_tokens=L, seed=0,
                                  step=0)
        return time.perf_counter() - t, ro.completion_ids.numel()

    def bare(m) -> tuple[float, int]:
        t = time.perf_counter()
        # the seed generate_rollout uses for this chunk
        torch.manual_seed(hash((0, 0, 0)) % (2 ** 31))
        with torch.no_grad(), ctx():
            out = m.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=L,
                             num_return_sequences=G, pad_token_id=tok.pad_token_id,
                             eos_token_id=eos)
        return time.perf_counter() - t, out[:, enc["input_ids"].shape[1]:].numel()

    merged = MergedGenerationCopy(model, amp).sync() if args.lora_r else model
    ours(), bare(model), bare(merged)  # warm-up
    a, b, c = [], [], []
    for _ in range(args.repeats):
        a.append(ours())
        b.append(bare(model))
        c.append(bare(merged))
    tps_a = statistics.median(n / s for s, n in a)
    tps_b = statistics.median(n / s for s, n in b)
    tps_c = statistics.median(n / s for s, n in c)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    res = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpu_count": os.cpu_count(),
                                                          "platform": platform.platform(),
                                                          "processor": platform.processor(),
                                                          "device": str(device),
                                                          "gpu": gpu},
           "settings": {**{k: v for k, v in vars(args).items() if k != "out"},
                        "autocast": str(amp)},
           "mogrpo_tokens_per_s": round(tps_a, 1), "bare_generate_tokens_per_s": round(tps_b, 1),
           "ratio_mogrpo_over_bare": round(tps_a / tps_b, 3),
           "bare_generate_merged_copy_tokens_per_s": round(tps_c, 1),
           "ratio_mogrpo_over_bare_merged_copy": round(tps_a / tps_c, 3),
           "raw": {"mogrpo": a, "bare": b, "bare_merged_copy": c}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"| | tokens/s (median of {args.repeats}) | mogrpo / this |\n|---|---|---|\n"
          f"| mogrpo generate_rollout | {tps_a:.1f} | |\n"
          f"| bare model.generate on the policy (peer) | {tps_b:.1f} | {tps_a / tps_b:.3f} |\n"
          f"| bare model.generate on a merged copy | {tps_c:.1f} | {tps_a / tps_c:.3f} |")


if __name__ == "__main__":
    main()
