"""Check the memory plan (mogrpo/memory.py, docs/scale.md) against a measured peak.

One GRPO step of a model with Qwen2.5-0.5B's shape (random weights,
benchmarks/random_models.py) in a fresh process per setting. The process's RSS is read
just before the policy is loaded (imports, the reward model and the accelerator are then
in place) and its peak RSS at the end; the difference is what the policy side of the run
cost, which is what the plan predicts. On a GPU (--device cuda) the same is done with
torch.cuda.max_memory_allocated (reset before the policy loads).

    python benchmarks/memory_plan_check.py [--device cpu|cuda] [--policy random:qwen2.5-0.5b]

Writes benchmarks/results/memory_plan_check.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name -> config overrides
    "full fine-tuning, fp32 weights": {"lora_r": 0},
    "full fine-tuning, checkpointing": {"lora_r": 0, "gradient_checkpointing": True},
    "LoRA r=16, fp32 weights": {"lora_r": 16, "lora_alpha": 32},
    "LoRA r=16, bf16 weights": {"lora_r": 16, "lora_alpha": 32, "policy_dtype": "bf16"},
}


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(a) -> None:
    import torch

    from mogrpo import models
    from mogrpo.memory import QWEN25, Setting, plan
    from mogrpo.rl import grpo

    marks = {}
    real_load = models.load_policy

    def load_policy(*args, **kw):  # the moment before the policy exists
        marks["rss_before_mb"] = rss_mb()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            marks["cuda_before_mb"] = torch.cuda.memory_allocated() / 2 ** 20
            torch.cuda.reset_peak_memory_stats()
        return real_load(*args, **kw)

    models.load_policy = load_policy
    # The default prompt set is built on the run's first rollout (about 1 GB of transient data
    # work, measured): build it once before the baseline, so the figure is the policy side's.
    from mogrpo.data.prompts import load_prompt_set

    load_prompt_set("default", None, "train")
    overrides = json.loads(a.overrides)
    cfg = grpo.GRPOConfig(policy=a.policy, reward_model=a.reward_model, train_prompts="default",
                          eval_prompts="none",
                          validation_prompts="none", batch_size=8, group_size=4,
                          max_new_tokens=a.tokens,
                          micro_batch_size=4, steps=1,
                          guided_samples=0, save_every=0, sample_every=0, report_to=[],
                          precision="auto",
                          **overrides)
    out = Path(a.workdir) / "run"
    grpo.train_grpo(cfg, out, show_progress=False)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shape = QWEN25[a.policy_size]
    cost = json.loads((out / "cost.json").read_text())
    setting = Setting(lora_r=cfg.lora_r, policy_dtype=cfg.policy_dtype,
                      amp=cost["precision"] != "fp32",
                      gradient_checkpointing=cfg.gradient_checkpointing,
                      micro_batch_size=cfg.micro_batch_size,
                      prompt_tokens=a.prompt_tokens, completion_tokens=cfg.max_new_tokens,
                      sequences_sampled=cfg.batch_size, group_size=cfg.group_size,
                      shared_prefix=cost.get("forward_path") == "shared_prefix")
    parts = plan(shape, setting)
    res = {"measured_mb": round(peak_rss - marks["rss_before_mb"], 1),
           "rss_before_mb": marks["rss_before_mb"],
           "peak_rss_mb": peak_rss, "predicted_mb": round(parts["total"] / 2 ** 20, 1),
           "parts_mb": {k: round(v / 2 ** 20, 1) for k, v in parts.items()},
           "precision": cost["precision"]}
    if torch.cuda.is_available():
        res["measured_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20
                                   - marks["cuda_before_mb"], 1)
    Path(a.result).write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="random:qwen2.5-0.5b")
    ap.add_argument("--reward-model", default=str(ROOT / "runs" / "reward-default" / "model"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=32,
                    help="max_new_tokens (random weights never stop early)")
    ap.add_argument("--prompt-tokens", type=int, default=64,
                    help="the longest chat-formatted prompt of a batch "
                                                                  "(the default prompts: 40-70 "
                                                                  "tokens)")
    ap.add_argument("--out",
                    default=str(ROOT / "benchmarks" / "results" / "memory_plan_check.json"))
    for name in ("--child", "--overrides", "--workdir", "--result", "--policy-size"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from random_models import resolve

    size = a.policy.removeprefix("random:qwen2.5-")
    policy = resolve(a.policy, os.environ.get("MOGRPO_CACHE"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    rows = {}
    for name, overrides in SETTINGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "r.json"
            cmd = [sys.executable, __file__, "--child", "1", "--overrides", json.dumps(overrides),
                   "--workdir", tmp,
                   "--result", str(result), "--policy", policy, "--policy-size", size,
                   "--reward-model",
                   a.reward_model, "--tokens", str(a.tokens), "--prompt-tokens",
                   str(a.prompt_tokens)]
            t = time.time()
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            rows[name] = {**json.loads(result.read_text()), "seconds": round(time.time() - t, 1)}
            r = rows[name]
            print(f"{name}: measured {r['measured_mb']:.0f} MB, planned {r['predicted_mb']:.0f} MB "
                  f"({r['measured_mb'] / r['predicted_mb']:.2f}x)", file=sys.stderr, flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": a.device, "policy": a.policy,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "settings": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print("| setting | planned MB | measured MB | measured / planned |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['predicted_mb']:.0f} | {r['measured_mb']:.0f} | "
              f"{r['measured_mb'] / r['predicted_mb']:.2f} |")


if __name__ == "__main__":
    main()
