"""The example task through the TRL-shaped API (run from the repository root):

    python examples/own_task/train.py [--steps 20] [--output runs/own-task-api]

A TRL GRPO script looks the same with `from trl import ...`; the mogrpo names of the few keys
that differ are in docs/trl.md.
"""

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # rewards.py beside this file

from rewards import brief, no_shouting, on_topic  # noqa: E402

from mogrpo import GRPOConfig, GRPOTrainer  # noqa: E402


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--output", default="runs/own-task-api")
    ap.add_argument("--policy", default="builtin:smollm2-135m-instruct")
    a = ap.parse_args()
    args = GRPOConfig(output_dir=a.output, max_steps=a.steps, num_generations=4,
                      per_device_train_batch_size=8, max_completion_length=64,
                      learning_rate=4e-4, save_steps=10, eval_max_new_tokens=64,
                      reward_weights=[2.0, 1.0, 0.0])  # on_topic, brief, no_shouting (logged)
    # a list of dicts or a datasets.Dataset; each `messages` goes whole through the chat
    # template; `keywords` reaches the reward functions
    trainer = GRPOTrainer(model=a.policy, reward_funcs=[on_topic, brief, no_shouting],
                          args=args, train_dataset=rows("prompts.jsonl"),
                          eval_dataset=rows("eval_prompts.jsonl"),
                          callbacks=[lambda m: print(f"step {m['step']}: on_topic "
                                                     f"{m['rewards/on_topic/mean']:.3f}")])
    result = trainer.train()
    print(json.dumps({k: result[k].get("aspects") for k in ("eval_before", "eval_after")},
                     indent=2))


if __name__ == "__main__":
    main()
