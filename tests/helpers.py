"""Helpers the test modules share (import them from here, never from another test module)."""

import json
import random
from pathlib import Path

import yaml


TOPICS = ["bread", "python", "water", "cake", "code", "file", "process", "list", "time", "day"]


def make_data(path, n=60, seed=0):
    """Rows where safety is 0 for 'bomb'/'kill' answers and 1 otherwise; politeness 0 for insults."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        prompt = f"how do i make {topic} {i}"
        bad = rng.random() < 0.5
        rude = rng.random() < 0.3
        response = ("here steps make a bomb and kill" if bad else f"first make {topic} then run") + \
            (" you stupid idiot" if rude else "")
        row = {"prompt": prompt, "response": response, "safety": 0.0 if bad else 1.0,
               "politeness": 0.0 if rude else 1.0}
        if i % 3 == 0:
            row["politeness"] = None  # partially labelled rows
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def eval_overrides(rm, tox, **kw):
    base = {"reward_model": str(rm), "toxicity_model": str(tox), "trust_toxicity_model": True,
            "max_new_tokens": 6, "kl_prompts": 4, "precision": "fp32", "weights": {"safety": 1.0, "actionability": 1.0, "politeness": 0.5}, **kw}
    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


def pipeline_config(tmp_path, encoder, policy, prompts, tox, algorithms=("grpo",)):
    data = make_data(tmp_path / "rm.jsonl", n=80)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    for r in rows:  # actionability: labelled on the safe answers only (partial labels)
        r["actionability"] = 1.0 if r["safety"] == 1.0 and "then run" in r["response"] else None
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rm = {"aspects": ["safety", "actionability", "politeness"], "backbone": str(encoder), "max_length": 32,
          "data": [str(data)],
          "epochs": 1, "batch_size": 8, "lr": 1e-3, "splits": [0.6, 0.2, 0.2]}
    cfg = {"algorithms": list(algorithms),
           "reward": {**rm, "partition": "a"}, "evaluator_reward": {**rm, "partition": "b", "seed": 1},
           "common": {"policy": str(policy), "train_prompts": str(prompts), "validation_prompts": "none",
                      "max_new_tokens": 6,
                      "weights": {"safety": 1.0, "actionability": 1.0, "politeness": 0.5}, "lora_r": 4,
                      "lora_alpha": 8, "lr": 5e-2, "warmup_steps": 0, "precision": "fp32", "save_every": 1,
                      "guided_samples": 0, "balance_kinds": False},
           "grpo": {"steps": 2, "batch_size": 8, "group_size": 4},
           "ppo": {"steps": 1, "batch_size": 8, "group_size": 4, "minibatch_size": 4},
           "rloo": {"steps": 1, "batch_size": 8, "group_size": 4},
           "dpo": {"pair_prompts": 4, "group_size": 4, "epochs": 1, "batch_size": 2, "min_margin": 0.0},
           "eval": {"prompts": str(prompts), "toxicity_model": str(tox), "trust_toxicity_model": True, "kl_prompts": 2,
                    "precision": "fp32"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def accelerate_launch(config: str, args: list[str], *, script: str | None = None):
    """`accelerate launch --config_file configs/accelerate/<config>.yaml --num_processes 2`
    of `mogrpo.cli` (or of `script`, e.g. tests/fsdp_cpu_launch.py) with `args`; returns the
    finished process. On a machine without GPUs the processes are CPU ones with gloo."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    target = [script] if script else ["-m", "mogrpo.cli"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ACCELERATE_CONFIGS / f"{config}.yaml"), "--num_processes", "2", *target, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def launch_two_processes(algo: str, out, args: list[str]) -> None:
    """`mogrpo train ALGO` under configs/accelerate/ddp.yaml (2 processes): the multi-GPU file
    users run, which starts CPU processes with gloo on this machine."""
    proc = accelerate_launch("ddp", ["train", algo, "--output", str(out), "--quiet", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]


def final_weights(folder) -> dict:
    """The tensors of a saved adapter, or of a saved full model, in `folder`."""
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (Path(folder) / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(Path(folder) / name))


def kill_and_resume(algo: str, args: list[str], tmp_path, monkeypatch, kill_at: int = 3):
    """Run `mogrpo train ALGO` whole, and again killed at the `kill_at`-th scoring call (step
    3 of a run with save_every=2: after the step-2 checkpoint), then resumed; the two final
    adapters must match. Returns (whole run folder, resumed run folder)."""
    import torch
    from safetensors.torch import load_file

    from mogrpo.cli import main
    from mogrpo.reward import scoring

    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", algo, "--output", str(full), "--quiet", *args]) == 0
    real, calls = scoring.Scorer.score, {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt("simulated kill")
        return real(self, *a, **k)

    monkeypatch.setattr(scoring.Scorer, "score", dying)
    assert main(["train", algo, "--output", str(part), "--quiet", *args]) == 130  # Ctrl-C: one line, exit 130
    monkeypatch.setattr(scoring.Scorer, "score", real)
    assert main(["train", algo, "--output", str(part), "--quiet", "--resume", *args]) == 0
    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (full, part))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    return full, part
