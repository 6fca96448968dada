"""TRL's config names with TRL's meaning (docs/trl.md is the whole table, and its test).

The policy configs resolve their keyword arguments and YAML keys alike
(`mogrpo.config.resolve_aliases`): plain renames are their `ALIASES`; the names below are more
than a rename (`translate_*`: a value converted, or one name setting several fields from the
others), or are refused with the reason (`REFUSED_*`: {name: (reason, accepted values)}; an
accepted value is what mogrpo does anyway and is dropped). Pure dict -> dict functions.

Batch sizes: TRL counts `per_device_train_batch_size` completions (GRPO, RLOO; pairs in DPO) per
process per micro-step and one optimiser step holds `per_device * processes *
gradient_accumulation_steps` of them; mogrpo's `batch_size` is that whole optimiser-step batch
and `micro_batch_size` the per-forward share. The process count is read at config time from
$WORLD_SIZE (set by `accelerate launch` and torchrun; 1 when unset).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from mogrpo.config import ConfigError

NEVER: tuple = ()  # refused whatever the value


def world_size() -> int:
    """The number of processes as known when a config is built: $WORLD_SIZE, default 1."""
    raw = os.environ.get("WORLD_SIZE", "1") or "1"
    try:
        return max(1, int(raw))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not a number of processes") from None


def value(cls, data: dict, name: str) -> Any:
    """The value field `name` of `cls` will have: the given one, else its default."""
    if name in data:
        return data[name]
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def _exclusive(cls, data: dict, trl: str, fields: tuple[str, ...]) -> None:
    for name in fields:
        if name in data:
            raise ConfigError(f"{cls.__name__}: {trl!r} sets {name!r}, which is also given; give "
                              f"only one of them")


def _whole(cls, name: str, x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x != int(x) or x < 0:
        raise ConfigError(f"{cls.__name__}: {name} = {x!r} must be a whole number >= 0")
    return int(x)


def translate_policy(cls, data: dict, optimizer_steps) -> dict:
    """What every policy config does with TRL's names: bf16/fp16 -> precision, warmup_ratio
    (and transformers 5's fractional warmup_steps) -> warmup_steps, report_to's "none",
    save_total_limit None, per_device_train_batch_size / gradient_accumulation_steps.
    `optimizer_steps(data)`: the run's optimiser steps (None where not known before the run)."""
    if "fp16" in data and data["fp16"] is not False:
        raise ConfigError(f"{cls.__name__}: 'fp16' is not supported: mogrpo computes in bf16 or "
                          f"fp32, never fp16 (bf16=true, or precision=bf16)")
    data.pop("fp16", None)
    if "bf16" in data:
        bf16 = data.pop("bf16")
        if bf16 is not None:
            if not isinstance(bf16, bool):
                raise ConfigError(f"{cls.__name__}: bf16 must be true or false, got {bf16!r}")
            _exclusive(cls, data, "bf16", ("precision",))
            data["precision"] = "bf16" if bf16 else "fp32"
    ratio = data.pop("warmup_ratio", None)
    steps = data.get("warmup_steps")
    if isinstance(steps, float) and 0 < steps < 1:  # transformers 5: a fraction of the run
        ratio, steps = steps, data.pop("warmup_steps")
    elif ratio is not None:
        _exclusive(cls, data, "warmup_ratio", ("warmup_steps",))
    if ratio is not None:
        total = optimizer_steps(data)
        if total is None:
            raise ConfigError(f"{cls.__name__}: 'warmup_ratio' is not supported: the number of "
                              f"optimiser steps is only known once the run has its data; give "
                              f"warmup_steps")
        given = ratio
        try:
            ratio = float(ratio) if not isinstance(ratio, bool) else None
        except (TypeError, ValueError):
            ratio = None
        if ratio is None or not 0 <= ratio <= 1:
            raise ConfigError(f"{cls.__name__}: warmup_ratio must be a number in [0, 1], got "
                              f"{given!r}")
        data["warmup_steps"] = math.ceil(ratio * total)
    if isinstance(data.get("warmup_steps"), float):
        data["warmup_steps"] = _whole(cls, "warmup_steps", data["warmup_steps"])
    report = data.get("report_to")
    if isinstance(report, str) or report is None and "report_to" in data:
        report = [] if report in (None, "none") else [report]
    if isinstance(report, list) and "all" in report:
        raise ConfigError(f"{cls.__name__}: report_to 'all' is not supported: name the backends "
                          f"(tensorboard, wandb); metrics.jsonl is always written")
    if report is not None:
        data["report_to"] = [r for r in report if r != "none"]
    if "keep_checkpoints" in data and data["keep_checkpoints"] is None:  # TRL: None keeps all
        data["keep_checkpoints"] = 0
    return data


def per_device_batch(cls, data: dict, *, micro: str | None, mini_batches: int = 1) -> None:
    """TRL's per_device_train_batch_size and gradient_accumulation_steps as mogrpo's sizes:
    batch_size = per_device * processes * accumulation (* mini_batches: PPO's batch holds
    `num_mini_batches` optimiser steps), and `micro` (micro_batch_size; PPO: minibatch_size, one
    optimiser step) = per_device, or per_device * processes * accumulation for PPO."""
    if "per_device_train_batch_size" not in data and "gradient_accumulation_steps" not in data:
        return
    given = "per_device_train_batch_size" in data
    per_device = data.pop("per_device_train_batch_size", None)
    accum = data.pop("gradient_accumulation_steps", 1)
    for name, x in (("per_device_train_batch_size", per_device),
                    ("gradient_accumulation_steps", accum)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
            raise ConfigError(f"{cls.__name__}: {name} = {x!r} must be a whole number >= 1")
    if per_device is None:  # accumulation alone: micro_batch_size stands for the per-device size
        if micro != "micro_batch_size":
            raise ConfigError(f"{cls.__name__}: gradient_accumulation_steps needs "
                              f"per_device_train_batch_size")
        per_device = value(cls, data, "micro_batch_size")
    world = world_size()
    _exclusive(cls, data, "per_device_train_batch_size" if given else
               "gradient_accumulation_steps", ("batch_size",))
    if micro == "micro_batch_size":
        if given:
            _exclusive(cls, data, "per_device_train_batch_size", (micro,))
        data[micro] = per_device
    elif micro is not None:  # PPO: one optimiser step = one minibatch
        _exclusive(cls, data, "per_device_train_batch_size", (micro,))
        data[micro] = per_device * world * accum
    data["batch_size"] = per_device * world * accum * mini_batches
    data["_accumulation"] = accum  # read by the generation-batch check, then dropped


def translate_online(cls, data: dict, *, count_optimiser_steps: bool = True) -> dict:
    """The rollout algorithms' TRL names: max_steps and save_steps count optimiser steps (mogrpo's
    steps and save_every count rollouts, each num_iterations optimiser steps; not for PPO, whose
    TRL trainer counts episodes), epsilon sets both clip sides unless epsilon_high is given, one
    generation batch per optimiser step, log_completions."""
    for trl, field, what in (("max_steps", "steps", "training"), ("save_steps", "save_every",
                                                                   "checkpoint")):
        if trl not in data or not count_optimiser_steps:
            continue
        mu = _whole(cls, "num_iterations", value(cls, data, "num_iterations"))
        x = data.pop(trl)
        _exclusive(cls, data, trl, (field,))
        if isinstance(x, (int, float)) and not isinstance(x, bool) and (x < 0 or 0 < x < 1):
            raise ConfigError(f"{cls.__name__}: {trl} = {x!r} is not supported: give the {what} "
                              f"length as a whole number of optimiser steps ({field} counts "
                              f"rollouts)")
        x = _whole(cls, trl, x)
        if mu and x % mu:
            raise ConfigError(f"{cls.__name__}: {trl} = {x} optimiser steps is not a whole number "
                              f"of rollouts of num_iterations = {mu} steps each; use a multiple of "
                              f"{mu} (mogrpo's {field} counts rollouts)")
        data[field] = x // max(mu, 1)
    if "epsilon" in data or "epsilon_high" in data:
        low, high = data.pop("epsilon", None), data.pop("epsilon_high", None)
        if low is not None:
            _exclusive(cls, data, "epsilon", ("eps_low", "eps_high"))
            data["eps_low"] = low
        if high is not None or low is not None:
            _exclusive(cls, data, "epsilon_high", ("eps_high",))
            data["eps_high"] = high if high is not None else low
    if "log_completions" in data:
        if not isinstance(data["log_completions"], bool):
            raise ConfigError(f"{cls.__name__}: log_completions must be true or false")
        if data.pop("log_completions") is False:
            _exclusive(cls, data, "log_completions", ("sample_every",))
            data["sample_every"] = 0
    accum = data.pop("_accumulation", 1)
    spg, gbs = data.pop("steps_per_generation", None), data.pop("generation_batch_size", None)
    if spg is not None and spg != accum:
        raise ConfigError(f"{cls.__name__}: steps_per_generation = {spg} is not supported: mogrpo "
                          f"samples one batch per optimiser step (num_iterations passes over it); "
                          f"leave it unset or equal to gradient_accumulation_steps ({accum})")
    if gbs is not None and gbs != value(cls, data, "batch_size"):
        raise ConfigError(f"{cls.__name__}: generation_batch_size = {gbs} is not supported: mogrpo "
                          f"samples one batch per optimiser step, batch_size = "
                          f"{value(cls, data, 'batch_size')}; leave it unset or equal")
    return data


def translate_ppo(cls, data: dict) -> dict:
    """TRL's PPO sizes: per_device_train_batch_size * processes * gradient_accumulation_steps
    sequences per optimiser step (minibatch_size), num_mini_batches of them per rollout
    (batch_size); total_episodes (sequences sampled over the run) -> steps."""
    mini = data.pop("num_mini_batches", None)
    if mini is not None and (isinstance(mini, bool) or not isinstance(mini, int) or mini < 1):
        raise ConfigError(f"{cls.__name__}: num_mini_batches = {mini!r} must be a whole number "
                          f">= 1")
    if "per_device_train_batch_size" in data or "gradient_accumulation_steps" in data:
        per_device_batch(cls, data, micro="minibatch_size", mini_batches=mini or 1)
        data.pop("_accumulation", None)
    elif mini is not None:
        _exclusive(cls, data, "num_mini_batches", ("minibatch_size",))
        batch = value(cls, data, "batch_size")
        if batch % mini:
            raise ConfigError(f"{cls.__name__}: num_mini_batches = {mini} does not divide "
                              f"batch_size = {batch}")
        data["minibatch_size"] = batch // mini
    if "total_episodes" in data:
        _exclusive(cls, data, "total_episodes", ("steps",))
        episodes = _whole(cls, "total_episodes", data.pop("total_episodes"))
        data["steps"] = max(1, math.ceil(episodes / value(cls, data, "batch_size")))
    return translate_online(cls, data, count_optimiser_steps=False)


def translate_loss_type(cls, data: dict) -> dict:
    """TRL's DPO takes loss_type as a list (several losses summed); mogrpo takes one."""
    lt = data.get("loss_type")
    if isinstance(lt, (list, tuple)):
        if len(lt) != 1:
            raise ConfigError(f"{cls.__name__}: loss_type = {lt!r}: mogrpo trains one DPO loss "
                              f"(sigmoid | ipo), not a weighted sum of several")
        data["loss_type"] = lt[0]
    return data


def epochs(cls, data: dict) -> dict:
    """TRL's num_train_epochs is a float; DPO's epochs are whole passes over the pairs."""
    if "num_train_epochs" in data:
        _exclusive(cls, data, "num_train_epochs", ("epochs",))
        x = data.pop("num_train_epochs")
        if isinstance(x, (int, float)) and not isinstance(x, bool) and x != int(x):
            raise ConfigError(f"{cls.__name__}: num_train_epochs = {x} is not supported: mogrpo's "
                              f"DPO makes whole passes over its pairs (epochs)")
        data["epochs"] = _whole(cls, "num_train_epochs", x)
    return data


_DROP = "mogrpo has no such setting"
# TrainingArguments (and TRL's shared base config) names that every policy config refuses
REFUSED_TRAINING: dict[str, tuple[str, tuple]] = {
    "logging_steps": ("mogrpo logs every step to metrics.jsonl, TensorBoard and W&B (a step takes "
                      "seconds; the report and checkpoint selection read every step): drop it",
                      (1,)),
    "logging_strategy": ("mogrpo logs every step: drop it", ("steps",)),
    "logging_first_step": ("mogrpo logs every step, the first included", (True, False)),
    "logging_dir": ("TensorBoard logs go to OUTPUT/tensorboard", (None,)),
    "save_strategy": ("mogrpo checkpoints every save_every steps and at the end", ("steps",)),
    "eval_strategy": ("mogrpo evaluates before and after training on eval_prompts and validates "
                      "every validate_every steps on validation_prompts (validation_prompts=none "
                      "turns that off)", NEVER),
    "eval_steps": ("use validate_every (steps between validations on validation_prompts)", NEVER),
    "per_device_eval_batch_size": ("mogrpo's evaluation batches by itself", NEVER),
    "load_best_model_at_end": ("final/ always holds the step the validation rule selects "
                               "(select_max_over_refusal, select_max_degenerate_rise)", NEVER),
    "metric_for_best_model": ("final/ holds the step the fixed validation rule selects", NEVER),
    "num_train_epochs": ("the rollout algorithms count steps, not passes over the prompts: give "
                         "max_steps (or steps)", NEVER),
    "optim": ("mogrpo optimises with torch's AdamW", ("adamw_torch", "adamw_torch_fused")),
    "adam_beta1": ("mogrpo's AdamW uses torch's default betas (0.9, 0.999)", (0.9,)),
    "adam_beta2": ("mogrpo's AdamW uses torch's default betas (0.9, 0.999)", (0.999,)),
    "adam_epsilon": ("mogrpo's AdamW uses torch's default eps (1e-8)", (1e-8,)),
    "lr_scheduler_kwargs": ("the schedules (lr_schedule) take no extra arguments", (None, {})),
    "use_cpu": ("mogrpo uses the GPU when there is one (CUDA_VISIBLE_DEVICES= hides it)", (False,)),
    "tf32": (_DROP, (None,)),
    "torch_compile": (_DROP, (False,)),
    "data_seed": ("seed also orders the prompts", (None,)),
    "full_determinism": (_DROP, (False,)),
    "dataloader_num_workers": ("mogrpo reads its prompt sets itself", (0,)),
    "remove_unused_columns": ("mogrpo reads its prompt sets itself (train_prompts)", (False, None)),
    "disable_tqdm": ("use the CLI's --quiet (train(show_progress=False))", (None, False)),
    "resume_from_checkpoint": ("use the CLI's --resume (train(resume=True)): it continues from "
                               "OUTPUT/checkpoints/latest", (None,)),
    "push_to_hub": ("mogrpo writes the run folder only", (False,)),
    "hub_model_id": ("mogrpo writes the run folder only", (None,)),
    "run_name": ("the W&B run is named after the output folder", (None,)),
    "project": ("the W&B project comes from $WANDB_PROJECT (default mogrpo)", NEVER),
    "deepspeed": ("launch with accelerate: accelerate launch --config_file "
                  "configs/accelerate/deepspeed-zero3.yaml -m mogrpo.cli train ...", (None,)),
    "fsdp": ("launch with accelerate: accelerate launch --config_file configs/accelerate/fsdp.yaml "
             "-m mogrpo.cli train ...", (None, "")),
    "ddp_find_unused_parameters": (_DROP, (None,)),
    "gradient_checkpointing_kwargs": (_DROP, (None,)),
    "save_only_model": ("checkpoints always hold the optimiser state (for --resume)", (False,)),
    "auto_find_batch_size": ("mogrpo's batch holds whole prompt groups; lower micro_batch_size "
                             "instead", (False,)),
    "model_init_kwargs": ("the policy's weights' dtype is policy_dtype (fp32 | bf16)", (None,)),
    "trust_remote_code": ("mogrpo loads Llama, Mistral, Qwen2 or any transformers causal LM "
                          "without remote code", (False,)),
    "disable_dropout": ("mogrpo keeps the model's own dropout (lora_dropout sets LoRA's)",
                        (False,)),
    "router_aux_loss_coef": ("mogrpo adds no Mixture-of-Experts auxiliary loss", (None,)),
    "cast_lm_head_to_fp32": ("the LM head computes like the rest of the policy (precision)",
                             (False,)),
    "pad_to_multiple_of": (_DROP, ("auto", None)),
    "sync_ref_model": ("the reference policy stays frozen", (False,)),
    "ref_model_mixup_alpha": ("the reference policy stays frozen (no TR-DPO sync)", NEVER),
    "ref_model_sync_steps": ("the reference policy stays frozen (no TR-DPO sync)", NEVER),
}

_VLLM = ("mogrpo samples with its own engine or transformers' generate (rollout_engine); no "
         "vLLM")
_LOG = ("mogrpo writes every sample every sample_every steps to samples.jsonl (and TensorBoard)")
# TRL's sampling-side names of its rollout trainers (GRPO, RLOO)
REFUSED_SAMPLING: dict[str, tuple[str, tuple]] = {
    "top_k": ("mogrpo samples the whole distribution (temperature, top_p)", (0, None)),
    "min_p": ("mogrpo samples the whole distribution (temperature, top_p)", (None,)),
    "generation_kwargs": ("mogrpo's sampling is set by temperature, top_p and max_new_tokens",
                          (None, {})),
    "chat_template_kwargs": ("prompts go through the tokenizer's chat template as they are",
                             (None, {})),
    "cache_implementation": ("mogrpo's engine keeps its own static KV cache", (None,)),
    "num_generations_eval": ("evaluation is greedy, one completion per prompt", (None,)),
    "shuffle_dataset": ("mogrpo draws each step's prompts at random from the seed (balance_kinds "
                        "balances the kinds)", (True,)),
    "ds3_gather_for_generation": ("under ZeRO-3 mogrpo always gathers the weights to sample",
                                  (True,)),
    "mask_truncated_completions": ("truncated completions train like the rest", (False,)),
    "use_transformers_continuous_batching": (_VLLM, (False,)),
    "transformers_continuous_batching_config": (_VLLM, (None,)),
    "use_transformers_paged": (_VLLM, (False,)),
    "num_completions_to_print": (_LOG, (None,)),
    "log_unique_prompts": (_LOG, (False,)),
    "log_multimodal": ("mogrpo trains on text only", (True, False)),
    "log_completions_hub_repo": ("mogrpo writes the run folder only", (None,)),
    "use_vllm": (_VLLM, (False,)),
    **{name: (_VLLM, NEVER) for name in (
        "vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex",
        "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
        "vllm_group_port", "vllm_gpu_memory_utilization", "vllm_max_model_length",
        "vllm_tensor_parallel_size", "vllm_importance_sampling_correction",
        "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
        "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap")},
}

_LOSS = "mogrpo's loss is the clipped surrogate (loss_aggregation grpo | dapo | dr_grpo)"
REFUSED_GRPO: dict[str, tuple[str, tuple]] = {
    "delta": ("no two-sided (INTELLECT-2) clip: " + _LOSS, (None,)),
    "importance_sampling_level": ("ratios are per token (no GSPO sequence level)", ("token",)),
    **{name: ("no SAPO/VESPO loss: " + _LOSS, NEVER) for name in (
        "sapo_temperature_neg", "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos",
        "vespo_k_neg", "vespo_lambda_neg")},
    "top_entropy_quantile": ("every completion token is trained", (1.0, 1)),
    "entropy_coef": ("no entropy bonus (the entropy is logged: log_entropy)", (0.0, 0)),
    "use_adaptive_entropy": ("no entropy bonus", (False,)),
    **{name: ("no entropy bonus", NEVER) for name in (
        "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target")},
    "max_tool_calling_iterations": ("no tool calling: one assistant turn per completion",
                                    (None,)),
    "off_policy_mask_threshold": ("no off-policy sequence masking", (None,)),
    "use_bias_correction_kl": ("the k3 KL penalty is not multiplied by the importance ratio "
                               "(TRL's false)", (False,)),
}

REFUSED_RLOO: dict[str, tuple[str, tuple]] = {
    "reward_clip_range": ("rewards are not clipped (the reward model's are in [0, 1])", (None,)),
    "scale_rewards": ("RLOO's leave-one-out advantages are not divided by a std; "
                      "normalize_advantages whitens the batch", NEVER),
}

REFUSED_DPO: dict[str, tuple[str, tuple]] = {
    "max_length": ("completions are cut at max_new_tokens and prompts at max_prompt_length",
                   NEVER),
    "truncation_mode": ("prompts keep their last max_prompt_length tokens", ("keep_end",)),
    "padding_free": (_DROP, (False,)),
    "precompute_ref_log_probs": ("the reference log-probs are always computed once and cached",
                                 (True, False)),
    "precompute_ref_batch_size": ("the reference log-probs are computed batch_size pairs at a "
                                  "time", (None,)),
    "loss_weights": ("one DPO loss (loss_type), no weighted sum", (None,)),
    "label_smoothing": ("no robust/conservative DPO", (0.0, 0)),
    "use_weighting": (_DROP, (False,)),
    "ld_alpha": (_DROP, (None,)),
    "f_divergence_type": ("the KL is the reverse KL", ("reverse_kl",)),
    "f_alpha_divergence_coef": ("the KL is the reverse KL", NEVER),
    "discopop_tau": ("no DiscoPOP loss (loss_type sigmoid | ipo)", NEVER),
    "activation_offloading": ("gradient_checkpointing is mogrpo's memory saver", (False,)),
    "dataset_num_proc": ("mogrpo builds its pairs itself", (None,)),
    "pad_token": ("the tokenizer's pad token is used", (None,)),
}

REFUSED_PPO: dict[str, tuple[str, tuple]] = {
    "whiten_rewards": ("mogrpo whitens the advantages (whiten_advantages), not the rewards",
                       (False,)),
    "num_sample_generations": ("use sample_every", NEVER),
    "local_rollout_forward_batch_size": ("forwards take the whole rollout", NEVER),
    "stop_token": ("completions stop at the tokenizer's EOS", (None,)),
    "stop_token_id": ("completions stop at the tokenizer's EOS", (None,)),
    "missing_eos_penalty": ("unfinished completions are scored like the rest", (None,)),
    "kl_estimator": ("the KL in the reward is the per-token log-ratio (TRL's k1)", ("k1",)),
    "max_steps": ("TRL's PPO sets its length with total_episodes: give total_episodes or steps",
                  NEVER),
    "sft_model_path": ("use policy", NEVER),
    "reward_model_path": ("use reward_model", NEVER),
}
