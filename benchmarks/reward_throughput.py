"""Reward-model scoring throughput on CPU: responses per second at 256 tokens, batch 64.

Measures `MultiAspectRewardModel.score` (tokenising, length-sorting, batching, pooling,
K heads) against its peer in the same run: a bare `AutoModel` forward of the same
backbone on the same already-tokenised batch. The ratio is mogrpo's overhead.
Alternates the two (A B A B ...) after a warm-up and reports medians.

    python benchmarks/reward_throughput.py [--model RUN/model] [--n 256] [--repeats 3]

Writes benchmarks/results/reward_throughput.json.
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
    ap.add_argument("--model", help="a trained reward model folder (default: fresh head on the "
                    "built-in MiniLM backbone, same compute)")
    ap.add_argument("--n", type=int, default=256, help="pairs per measurement")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out",
                    default=str(Path(__file__).parent / "results" / "reward_throughput.json"))
    args = ap.parse_args()

    from mogrpo.assets import default_backbone_dir
    from mogrpo.models import autocast_dtype
    from mogrpo.reward.model import MultiAspectRewardModel

    torch.set_num_threads(args.threads)
    if args.model:
        model = MultiAspectRewardModel.load(args.model)
        model.spec.max_length = args.max_length
    else:
        model = MultiAspectRewardModel.from_backbone(
            str(default_backbone_dir()), ["safety", "actionability", "politeness",
                                          "meaningfulness"],
            max_length=args.max_length, seed=0)
    model.eval()
    dtype = autocast_dtype(torch.device("cpu"), args.precision)
    model.autocast_dtype = dtype
    # Every pair is longer than max_length, so every one is scored at exactly 256 tokens.
    words = "the model answers the question with a careful and detailed explanation".split()
    prompts = [f"Question {i}: please explain topic number {i} in detail." for i in range(args.n)]
    responses = [" ".join(words[(i + j) % len(words)] for j in range(400)) for i in range(args.n)]

    batch, n_trunc = model.encode(prompts[: args.batch_size], responses[: args.batch_size])
    assert batch["input_ids"].shape[1] == args.max_length and n_trunc == args.batch_size

    def ours() -> float:
        t = time.perf_counter()
        model.score(prompts, responses, batch_size=args.batch_size)
        return time.perf_counter() - t

    def bare() -> float:
        # Peer: the backbone alone on pre-tokenised batches (no tokenising, pooling or heads).
        ctx = torch.autocast("cpu", dtype=dtype) if dtype else nullcontext()
        t = time.perf_counter()
        with torch.inference_mode(), ctx:
            for _ in range(0, args.n, args.batch_size):
                model.backbone(**batch)
        return time.perf_counter() - t

    ours(), bare()  # warm-up
    a, b = [], []
    for _ in range(args.repeats):
        a.append(ours())
        b.append(bare())
    ta, tb = statistics.median(a), statistics.median(b)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu_threads": args.threads, "cores": os.cpu_count(),
                    "platform": platform.platform(),
                    "processor": platform.processor()},
        "settings": {"n": args.n, "batch_size": args.batch_size, "max_length": args.max_length,
                     "precision": str(dtype or "fp32"),
                     "model": args.model or "fresh head, MiniLM"},
        "mogrpo_score_per_s": round(args.n / ta, 1),
        "bare_backbone_forward_per_s": round(args.n / tb, 1),
        "time_ratio_mogrpo_over_bare": round(ta / tb, 3),
    }
    print(f"{'':<32}{'responses/s':>12}")
    print(f"{'mogrpo score()':<32}{result['mogrpo_score_per_s']:>12}")
    print(f"{'bare backbone forward (peer)':<32}{result['bare_backbone_forward_per_s']:>12}")
    print(f"time ratio mogrpo / bare: {result['time_ratio_mogrpo_over_bare']}  "
          f"(precision {result['settings']['precision']}, {args.threads} threads, "
          f"{args.max_length} tokens, batch {args.batch_size})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
