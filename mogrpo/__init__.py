"""mogrpo: multi-objective GRPO for safe and aligned language generation.

The Python API (the CLI calls the same functions):

    from mogrpo import GRPOConfig, train, evaluate, EvalConfig, MultiAspectRewardModel

    cfg = GRPOConfig(reward_model="runs/reward-default/model", steps=20, lr=4e-4)
    result = train(cfg, "runs/grpo")                      # PPOConfig, DPOConfig, RLOOConfig alike
    report = evaluate("runs/grpo", EvalConfig(max_prompts=40), "runs/grpo/eval")
    rm = MultiAspectRewardModel.load("runs/reward-default/model")
    rm.score(["How do I bake bread?"], ["Mix flour, water and yeast, then ..."])  # [1, K]

Names are imported on first use, so `import mogrpo` stays cheap. `load_config(GRPOConfig,
"my.yaml")` also accepts TRL's names (learning_rate, num_generations, beta, epsilon, ...).
"""

from mogrpo._version import __version__  # noqa: F401

_API = {  # name -> module
    "load_config": "mogrpo.config",
    "GRPOConfig": "mogrpo.rl.grpo", "PPOConfig": "mogrpo.rl.ppo", "DPOConfig": "mogrpo.rl.dpo",
    "RLOOConfig": "mogrpo.rl.rloo", "train": "mogrpo.rl.registry",
    "RewardTrainConfig": "mogrpo.reward.config", "train_reward_model": "mogrpo.reward.train",
    "MultiAspectRewardModel": "mogrpo.reward.model", "RewardObjective": "mogrpo.reward.objective",
    "EvalConfig": "mogrpo.eval.harness", "evaluate": "mogrpo.eval.harness",
    "RunConfig": "mogrpo.pipeline", "run_pipeline": "mogrpo.pipeline",
    "GRPOTrainer": "mogrpo.trainers", "PPOTrainer": "mogrpo.trainers",
    "DPOTrainer": "mogrpo.trainers", "RLOOTrainer": "mogrpo.trainers",
    "HFRewardModel": "mogrpo.reward.sources", "PythonReward": "mogrpo.reward.sources",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'mogrpo' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
