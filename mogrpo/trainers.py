"""Trainers in TRL's shape over mogrpo's algorithms, so a TRL script changes its imports and
little else:

    from mogrpo import GRPOConfig, GRPOTrainer

    def short(prompts, completions, **kw):  # TRL's reward function signature
        return [1.0 if len(c.split()) < 40 else 0.0 for c in completions]

    trainer = GRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct",
                          reward_funcs=[short, "OpenAssistant/reward-model-deberta-v3-large-v2"],
                          args=GRPOConfig(output_dir="runs/mine", max_steps=50,
                                          num_generations=4),
                          train_dataset=dataset)
    trainer.train()

Each trainer builds the algorithm's config and calls its train function (mogrpo/rl/), the
one the CLI calls: the same loop, checkpoints, resume, evaluation and run folder. What the
trainer adds is the translation of Python objects:
- `model`: a hub id, folder or builtin name, or a loaded model (saved into the run folder
  as base_model/, so the run folder says what it started from);
- `reward_funcs`: functions, reward models, folders or hub ids (reward/sources.py), mixed
  in one objective with `args.reward_weights` or `args.weights`;
- `train_dataset` / `eval_dataset`: a `datasets.Dataset` or a list of dicts, plain
  `prompt` strings or conversations (`prompt` / `messages` as message lists, rendered whole
  through the chat template), renamed by `column_mapping`; written into the run folder;
- `peft_config`: a peft `LoraConfig` (its r, alpha, dropout and target modules);
- `callbacks`: functions of each step's metrics, or objects with `on_log`.
Without `eval_dataset`, a trainer given its own `train_dataset` evaluates and validates
nothing (the default evaluation and validation sets belong to the safety task).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar


class _Trainer:
    algorithm: ClassVar[str]

    def __init__(self, model: Any = None, reward_funcs: Any = None, args: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, peft_config: Any = None,
                 callbacks: list | None = None, column_mapping: dict[str, str] | None = None):
        from mogrpo.rl.registry import algorithm

        entry = algorithm(self.algorithm)
        cls = entry.config_class()
        if args is None:
            args = cls()
        if not isinstance(args, cls):
            raise TypeError(f"args must be a {cls.__name__} (from mogrpo import "
                            f"{cls.__name__}), got {type(args).__name__}")
        self.args = cfg = dataclasses.replace(args)  # the caller's object is left as it was
        self.train_function = entry.train_function()
        self.output_dir = Path(cfg.output_dir or f"runs/{self.algorithm}")
        self.model, self.processing_class = model, processing_class
        if processing_class is not None and (model is None or isinstance(model, (str, Path))):
            raise ValueError("processing_class goes with a loaded model object; with a model id "
                             "or folder the tokenizer is loaded from it")
        if isinstance(model, (str, Path)):
            cfg.policy = str(model)
        if peft_config is not None:
            cfg.lora_r, cfg.lora_alpha = int(peft_config.r), int(peft_config.lora_alpha)
            cfg.lora_dropout = float(peft_config.lora_dropout)
            targets = peft_config.target_modules
            cfg.lora_target_modules = (None if targets in (None, "all-linear")
                                       else [targets] if isinstance(targets, str)
                                       else sorted(targets))
        self.reward_funcs = ([] if reward_funcs is None else
                             list(reward_funcs) if isinstance(reward_funcs, (list, tuple))
                             else [reward_funcs])
        self.files: dict[str, list[dict]] = {}
        if train_dataset is not None:
            self.files.update(self.dataset_files(train_dataset, column_mapping))
            for key in ("eval_prompts", "validation_prompts"):
                if getattr(cfg, key) == "default":  # the safety task's sets
                    setattr(cfg, key, "none")
        if eval_dataset is not None:
            self.files["eval_prompts"] = prompt_rows(eval_dataset, "eval_dataset",
                                                     column_mapping)
        self.callbacks = list(callbacks or [])

    def dataset_files(self, dataset, column_mapping) -> dict[str, list[dict]]:
        return {"train_prompts": prompt_rows(dataset, "train_dataset", column_mapping)}

    def default_sources(self) -> list | None:
        """The rewards without `reward_funcs`: the config's (None)."""
        return None

    def train(self, resume_from_checkpoint: bool | str | None = None) -> dict:
        """Train; `resume_from_checkpoint` (True, or the run folder) resumes from the run
        folder's newest checkpoint. Returns the run's result (evaluations before and after,
        the selected step, the cost)."""
        from mogrpo.reward.sources import as_source

        if isinstance(resume_from_checkpoint, (str, Path)) and \
                Path(resume_from_checkpoint).resolve() != self.output_dir.resolve():
            raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r}: mogrpo resumes "
                             f"a run in its own folder, args.output_dir ({self.output_dir}); "
                             f"pass True")
        if self.model is not None and not isinstance(self.model, (str, Path)):
            self.args.policy = str(self.save_model())
        sources = [as_source(r) for r in self.reward_funcs] or self.default_sources()
        return self.train_function(self.args, self.output_dir,
                                   resume=bool(resume_from_checkpoint),
                                   reward_sources=sources, files=self.files,
                                   callbacks=self.callbacks)

    def save_model(self) -> Path:
        """A loaded model (and its tokenizer) saved beside the run, so the run starts from a
        folder that its config.yaml can name."""
        from mogrpo.config import atomic_folder

        folder = self.output_dir.parent / f"{self.output_dir.name}-base_model"
        model = self.model
        if hasattr(model, "merge_and_unload"):
            raise ValueError("model is a PEFT model: pass its base model and the LoRA settings "
                             "as peft_config (mogrpo adds the adapters)")
        tok = self.processing_class
        if tok is None:
            from transformers import AutoTokenizer

            name = getattr(model, "name_or_path", "")
            if not name:
                raise ValueError("a loaded model without name_or_path needs processing_class "
                                 "(its tokenizer)")
            tok = AutoTokenizer.from_pretrained(name)
        with atomic_folder(folder) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        return folder


def prompt_rows(dataset, name: str, column_mapping: dict[str, str] | None) -> list[dict]:
    """A dataset's rows as prompt-file rows (validated; ids given where there are none)."""
    from mogrpo.data.loaders import prompts_from_rows

    return [r.to_dict() for r in prompts_from_rows(dataset, name=name,
                                                   column_mapping=column_mapping)]


class GRPOTrainer(_Trainer):
    """Multi-objective GRPO (mogrpo/rl/grpo.py) with TRL's constructor."""

    algorithm = "grpo"


class RLOOTrainer(_Trainer):
    """RLOO (mogrpo/rl/rloo.py) with TRL's constructor."""

    algorithm = "rloo"


class PPOTrainer(_Trainer):
    """PPO-RLHF (mogrpo/rl/ppo.py; its critic is built from the policy) with the GRPO
    trainer's constructor: `reward_funcs` as there (TRL's PPOTrainer takes one
    `reward_model`; pass it as reward_funcs=[model])."""

    algorithm = "ppo"


class DPOTrainer(_Trainer):
    """DPO (mogrpo/rl/dpo.py). `train_dataset` with `prompt`, `chosen` and `rejected`
    (strings, or TRL's conversational form) trains on those pairs; with only prompts, pairs
    are sampled from the reference policy and chosen by the reward objective
    (`reward_funcs`)."""

    algorithm = "dpo"

    def dataset_files(self, dataset, column_mapping) -> dict[str, list[dict]]:
        rows = [{(column_mapping or {}).get(k, k): v for k, v in dict(r).items()}
                for r in dataset]
        if not (rows and all("chosen" in r and "rejected" in r for r in rows)):
            return super().dataset_files(dataset, column_mapping)

        def text(x) -> str:  # a conversational answer: its (last) assistant turn
            return x if isinstance(x, str) else [m["content"] for m in x
                                                 if m.get("role") == "assistant"][-1]
        pairs = []
        for i, r in enumerate(rows):
            if "prompt" not in r:
                raise ValueError(f"train_dataset row {i}: a preference pair needs 'prompt', "
                                 f"'chosen' and 'rejected'")
            pairs.append({"prompt": r["prompt"], "chosen": text(r["chosen"]),
                          "rejected": text(r["rejected"])})
        return {"pairs": pairs}

    def default_sources(self) -> list | None:
        """Preference pairs given and no reward_funcs: no reward at all (the pairs need none,
        and the evaluations then report the judges alone), unless the config names some."""
        if "pairs" in self.files and self.args.rewards is None:
            return []
        return None
