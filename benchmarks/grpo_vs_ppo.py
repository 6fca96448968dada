"""GRPO against mogrpo's PPO-RLHF at the same rollout budget: seconds per step, peak memory,
seconds per phase.

Both runs: SmolLM2-135M-Instruct with LoRA r=16 (PPO: on the actor and on its critic),
the same reward model and weights, the same prompts and seeds, 16 sampled completions of
48 tokens per step (GRPO: 4 prompts x G=4; PPO: 4 prompts x 4 samples), so both sample
the identical first rollout. GRPO makes one optimisation pass per rollout (its default,
DeepSeekMath's); PPO makes its default 2 epochs x 2 minibatches with the critic. Each run is
a fresh process (`mogrpo train ...`; peak RSS is per run), the two alternate
(A B A B ...), the first step of every run is a warm-up and is left out of the medians.

    python benchmarks/grpo_vs_ppo.py --reward-model runs/reward-default/model [--steps 4] [--repeats
    2]

Writes benchmarks/results/grpo_vs_ppo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = {"eval_prompts": "none", "validation_prompts": "none", "save_every": 0,
          "max_new_tokens": 48, "lora_r": 16,
          "lora_alpha": 32, "batch_size": 16}
SPECIFIC = {"grpo": {"group_size": 4}, "ppo": {"samples_per_prompt": 4}}


def run_once(algo: str, steps: int, reward_model: str, folder: Path, extra: list[str]) -> dict:
    args = {**COMMON, **SPECIFIC[algo], "steps": steps + 1, "reward_model": reward_model}
    cmd = [sys.executable, "-m", "mogrpo.cli", "train", algo, "--output", str(folder), "--quiet",
           *[f"{k}={json.dumps(v)}" for k, v in args.items()], *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    cost = json.loads((folder / "cost.json").read_text())
    return {"step_seconds": [r["step_seconds"] for r in rows[1:]],
            "peak_memory_mb": cost["peak_memory_mb"],
            "phase_seconds_per_step": {k: v / (steps + 1) for k, v in cost["phase_seconds"].items()
                                       if k != "evaluation"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reward-model", default="runs/reward-default/model")
    ap.add_argument("--steps", type=int, default=4,
                    help="timed steps per run (after 1 warm-up step)")
    ap.add_argument("--repeats", type=int, default=2, help="A B pairs")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "grpo_vs_ppo.json"))
    ap.add_argument("overrides", nargs="*", help="key=value for both runs (e.g. precision=fp32)")
    args = ap.parse_args()

    runs: dict[str, list[dict]] = {"grpo": [], "ppo": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for algo in ("grpo", "ppo"):
                print(f"run {r + 1}/{args.repeats}: {algo}", file=sys.stderr)
                runs[algo].append(run_once(algo, args.steps, args.reward_model,
                                           Path(tmp) / f"{algo}-{r}",
                                           args.overrides))
    summary = {}
    for algo, rs in runs.items():
        phases = sorted({p for x in rs for p in x["phase_seconds_per_step"]})
        summary[algo] = {"seconds_per_step": statistics.median(s for x in rs
                                                               for s in x["step_seconds"]),
                         "peak_memory_mb": statistics.median(x["peak_memory_mb"] for x in rs),
                         "phase_seconds_per_step": {
                             p: statistics.median(x["phase_seconds_per_step"].get(p, 0.0)
                                                  for x in rs) for p in phases}}
    g, p = summary["grpo"], summary["ppo"]
    ratios = {"time": g["seconds_per_step"] / p["seconds_per_step"],
              "memory": g["peak_memory_mb"] / p["peak_memory_mb"]}
    res = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "processor": platform.processor()},
           "summary": summary, "ratio_grpo_over_ppo": ratios, "raw": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    phases = sorted(set(g["phase_seconds_per_step"]) | set(p["phase_seconds_per_step"]))
    print("| | GRPO | PPO | GRPO / PPO |\n|---|---|---|---|")
    print(f"| s/step (median) | {g['seconds_per_step']:.2f} | {p['seconds_per_step']:.2f} | "
          f"{ratios['time']:.2f} |")
    print(f"| peak memory (MB) | {g['peak_memory_mb']:.0f} | {p['peak_memory_mb']:.0f} | "
          f"{ratios['memory']:.2f} |")
    for ph in phases:
        a, b = g["phase_seconds_per_step"].get(ph, 0.0), p["phase_seconds_per_step"].get(ph, 0.0)
        print(f"| {ph} s/step | {a:.2f} | {b:.2f} | {a / b if b else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
