"""Where a rollout's seconds go: torch.profiler over one `generate_rollout` with each engine.

Same policy and batch as benchmarks/rollout_throughput.py (SmolLM2-135M-Instruct, LoRA
r=16, frozen weights in the autocast dtype, 4 prompts x G=4, 48 new tokens):
- before: `engine="generate"` on a merged copy of the policy (models.MergedGenerationCopy),
  what mogrpo's trainers sampled with before the rollout engine;
- after: `engine="mogrpo"` on the policy itself (mogrpo/generation.py).
Each gets one warm-up rollout, then one profiled rollout (profiling adds ~30% overhead to
small ops; the wall times without it are the throughput benchmark's). Operators are grouped
by what they do, by self CPU time.

    python benchmarks/profile_rollout.py [--policy random:qwen2.5-0.5b] [--top 12]

Writes benchmarks/results/profile_rollout.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

GROUPS = {  # operator -> what it does (anything else: "other small ops")
    "matmuls (weights)": {"aten::mm", "aten::addmm"},
    "attention": {"aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_attention_math", "aten::baddbmm"},
    "sampling draws": {"aten::exponential_", "aten::multinomial", "aten::cumsum",
                       "aten::searchsorted",
                       "aten::uniform_", "aten::argmax", "aten::_softmax", "aten::sort"},
    "copies and casts": {"aten::copy_", "aten::_to_copy", "aten::cat", "aten::index_put_",
                         "aten::clone",
                         "aten::empty_strided", "aten::empty", "aten::resize_"},
}


def group_of(name: str) -> str:
    return next((g for g, names in GROUPS.items() if name in names), "other small ops")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--top", type=int, default=12, help="operators listed per engine")
    ap.add_argument("--out",
                    default=str(Path(__file__).parent / "results" / "profile_rollout.json"))
    args = ap.parse_args()

    from random_models import resolve
    from torch.profiler import ProfilerActivity, profile

    from mogrpo.data.prompts import load_prompt_set
    from mogrpo.models import MergedGenerationCopy, autocast_dtype, cast_frozen_linears, load_policy
    from mogrpo.rollout import generate_rollout

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    amp = autocast_dtype(device, "auto")
    torch.manual_seed(0)
    model, tok = load_policy(resolve(args.policy, os.environ.get("MOGRPO_CACHE")), lora_r=16,
                             lora_alpha=32)
    model.eval()
    cast_frozen_linears(model, amp)
    merged = MergedGenerationCopy(model, amp).sync()
    prompts = load_prompt_set("default", None, "train")[: args.prompts]
    texts, kinds = [p.text for p in prompts], [p.kind for p in prompts]
    ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp else nullcontext
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": vars(args),
              "engines": {}}
    for label, engine, m in (("before: generate on a merged copy", "generate", merged),
                             ("after: mogrpo's engine on the policy", "mogrpo", model)):
        def run(m=m, engine=engine):
            with ctx():
                return generate_rollout(m, tok, texts, kinds, group_size=args.group_size,
                                        max_new_tokens=args.max_new_tokens, engine=engine)
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            ro = run()
            wall = time.perf_counter() - t
        ops = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
        total = sum(s for _, s, _ in ops)
        groups: dict[str, float] = {}
        for name, s, _ in ops:
            groups[group_of(name)] = groups.get(group_of(name), 0.0) + s
        steps = ro.completion_ids.shape[1]
        result["engines"][label] = {
            "wall_seconds_profiled": round(wall, 3), "decoding_steps": steps,
            "self_cpu_seconds": round(total, 3),
            "groups_seconds": {k: round(v, 3) for k, v in sorted(groups.items(),
                                                                 key=lambda kv: -kv[1])},
            "top_ops": [{"op": n, "self_seconds": round(s, 3), "calls": c}
                        for n, s, c in sorted(ops, key=lambda o: -o[1])[: args.top]]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    labels = list(result["engines"])
    names = sorted({g for e in result["engines"].values() for g in e["groups_seconds"]},
                   key=lambda g: -result["engines"][labels[0]]["groups_seconds"].get(g, 0))
    print("| self CPU seconds | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels))
    for g in names:
        print(f"| {g} | " + " | ".join(f"{result['engines'][lab]['groups_seconds'].get(g, 0):.3f}"
                                       for lab in labels)
              + " |")
    print("| **all operators** | "
          + " | ".join(f"**{result['engines'][lab]['self_cpu_seconds']:.3f}**" for lab in labels)
          + " |")
    print("| wall (profiled) | "
          + " | ".join(f"{result['engines'][lab]['wall_seconds_profiled']:.3f}" for lab in labels)
          + " |")
    for lab in labels:
        print(f"\n{lab}: top operators\n\n| op | self s | calls |\n|---|---|---|")
        for o in result["engines"][lab]["top_ops"]:
            print(f"| {o['op']} | {o['self_seconds']:.3f} | {o['calls']} |")


if __name__ == "__main__":
    main()
