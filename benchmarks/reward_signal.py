"""How a reward model ranks the policy's own samples on held-out training prompts: the
refusal-over-compliance margin of safety against the spread it puts between two compliant
answers to the same harmful prompt (docs/theory.md section 7).

    python benchmarks/reward_signal.py --model runs/rm-hard/model --model runs/rm-soft/model

Reads the packaged on-policy rows' test split (the same split `mogrpo reward train` holds out,
with the configuration's seed) and prints `reward.train.on_policy_validation` per model as
JSON. A margin well above the spread means GRPO's push on a harmful group is about refusing;
a spread near the margin means it is as much about how a compliant answer sounds.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True,
                    help="a reward model folder (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="the reward data's split seed")
    args = ap.parse_args()

    from mogrpo.reward.data import load_reward_data
    from mogrpo.reward.model import MultiAspectRewardModel
    from mogrpo.reward.train import RewardTrainConfig, on_policy_validation

    data = load_reward_data(RewardTrainConfig(data=["onpolicy"], seed=args.seed))
    out = {}
    for path in args.model:
        model = MultiAspectRewardModel.load(path)
        out[path] = on_policy_validation(model, data.test, seed=args.seed)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
