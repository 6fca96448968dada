"""TRL's names mean in mogrpo what they mean in TRL (docs/trl.md, mogrpo/rl/trl_names.py).

docs/trl.md's tables are the specification: for every row whose mogrpo column names a field,
the example in its notes (`TRL: value` -> `field: value`) is built with the config class as a
keyword argument and compared; for every "not supported" row, the name is refused with a
message, and each value its notes call a no-op is accepted. Then the semantics one by one.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from mogrpo.config import ConfigError, load_config
from mogrpo.rl.dpo import DPOConfig
from mogrpo.rl.grpo import GRPOConfig
from mogrpo.rl.ppo import PPOConfig
from mogrpo.rl.rloo import RLOOConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "trl.md"
SECTIONS = {"GRPO": GRPOConfig, "PPO": PPOConfig, "DPO": DPOConfig, "RLOO": RLOOConfig}
PAIR = r"`(\w+): ([^`]*)`"
EXAMPLE = re.compile(PAIR + r" -> ((?:" + PAIR + r"(?:, )?)+)")
# a refused name whose value must be of the field's type to reach the refusal
REFUSED_VALUE = {"repetition_penalty": 1.2}


def rows() -> list[tuple[type, str, str, str]]:
    """(config class, TRL field, mogrpo column, notes) of every table row, by section."""
    out, cls = [], None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            cls = SECTIONS.get(line[3:].split(":")[0].strip())
        m = re.match(r"^\| `(\w+)` \| (.+?) \| (.*) \|$", line)
        if m and cls is not None:
            out.append((cls, *m.groups()))
    return out


ROWS = rows()
MAPPED = [r for r in ROWS if r[2] != "not supported"]
REFUSED = [r for r in ROWS if r[2] == "not supported"]


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_the_doc_has_every_kind_of_row():
    assert {cls for cls, *_ in ROWS} == set(SECTIONS.values())
    assert len(MAPPED) > 40 and len(REFUSED) > 100
    for cls, name, mogrpo, _ in MAPPED:
        assert re.fullmatch(r"`\w+`(, `\w+`)*", mogrpo), (cls.__name__, name, mogrpo)


@pytest.mark.parametrize("cls, name, mogrpo, notes", MAPPED,
                         ids=[f"{r[0].__name__}-{r[1]}" for r in MAPPED])
def test_mapped_name_sets_the_field_the_doc_names(cls, name, mogrpo, notes):
    examples = EXAMPLE.findall(notes)
    assert examples, f"{name}: the notes need an example `{name}: value` -> `field: value`"
    fields = {f.name for f in dataclasses.fields(cls)}
    for trl, raw, sets, *_ in examples:
        assert trl == name
        value = yaml.safe_load(f"x: {raw}")["x"]
        want = {k: yaml.safe_load(f"x: {v}")["x"] for k, v in re.findall(PAIR, sets)}
        assert set(re.findall(r"`(\w+)`", mogrpo)) <= set(want) <= fields
        cfg = cls(**{name: value})
        assert {k: getattr(cfg, k) for k in want} == want
        # the YAML loader resolves the same way
        assert load_config(cls, None, [f"{name}={raw}"]) == cfg


@pytest.mark.parametrize("cls, name, mogrpo, notes", REFUSED,
                         ids=[f"{r[0].__name__}-{r[1]}" for r in REFUSED])
def test_unsupported_name_is_refused_with_a_reason(cls, name, mogrpo, notes):
    with pytest.raises(ValueError) as exc:
        cls(**{name: REFUSED_VALUE.get(name, "__not_a_no_op__")})
    message = str(exc.value)
    assert name in message and len(message) > len(name) + 40, message
    no_ops = re.search(r"no-op: ((?:`[^`]*`(?:, )?)+)", notes)
    for raw in re.findall(r"`([^`]*)`", no_ops.group(1)) if no_ops else []:
        value = yaml.safe_load(f"x: {raw}")["x"]
        assert cls(**{name: value}) == cls(), (name, value)


def test_every_trl_grpo_field_has_a_row():
    trl = pytest.importorskip("trl")
    from transformers import TrainingArguments

    own = {f.name for f in dataclasses.fields(trl.GRPOConfig)} - {
        f.name for f in dataclasses.fields(TrainingArguments)}
    user_sets = {"output_dir", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "learning_rate", "num_train_epochs", "max_steps", "warmup_steps",
                 "lr_scheduler_type", "logging_steps", "save_steps", "save_total_limit", "seed",
                 "bf16", "fp16", "report_to", "gradient_checkpointing", "max_grad_norm",
                 "weight_decay", "optim", "eval_strategy", "resume_from_checkpoint"}
    documented = {name for cls, name, *_ in ROWS if cls is GRPOConfig}
    assert own | user_sets | {"warmup_ratio"} <= documented


def test_unknown_name_names_the_nearest_field():
    with pytest.raises(ConfigError, match="the nearest field to 'learnig_rate' is 'lr'"):
        GRPOConfig(learnig_rate=1e-5)
    with pytest.raises(ConfigError, match="nearest field to 'num_generation' is 'group_size'"):
        GRPOConfig(num_generation=4)
    with pytest.raises(ConfigError, match="another name for 'lr'"):
        GRPOConfig(lr=1e-4, learning_rate=1e-5)


def test_a_trl_script_changes_its_imports_and_little_else():
    cfg = GRPOConfig(output_dir="runs/x", max_steps=20, num_generations=4,
                     per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     max_completion_length=32, report_to="none", learning_rate=1e-5, beta=0.0,
                     epsilon=0.2, epsilon_high=0.28, num_iterations=2, loss_type="dapo",
                     scale_rewards="batch", bf16=False, fp16=False, logging_steps=1,
                     warmup_ratio=0.1, seed=3, use_vllm=False, top_k=0)
    assert (cfg.output_dir, cfg.steps, cfg.group_size, cfg.micro_batch_size, cfg.batch_size,
            cfg.max_new_tokens, cfg.report_to, cfg.lr, cfg.beta, cfg.eps_low, cfg.eps_high,
            cfg.loss_aggregation, cfg.scale_rewards, cfg.precision, cfg.warmup_steps,
            cfg.seed) == ("runs/x", 10, 4, 4, 8, 32, [], 1e-5, 0.0, 0.2, 0.28, "dapo", "batch",
                          "fp32", 2, 3)


def test_epsilon_sets_both_sides_unless_epsilon_high():
    assert (GRPOConfig(epsilon=0.1).eps_low, GRPOConfig(epsilon=0.1).eps_high) == (0.1, 0.1)
    both = GRPOConfig(epsilon=0.1, epsilon_high=0.28)
    assert (both.eps_low, both.eps_high) == (0.1, 0.28)
    high = GRPOConfig(epsilon_high=0.28)
    assert (high.eps_low, high.eps_high) == (0.2, 0.28)
    clip = PPOConfig(cliprange=0.3)
    assert (clip.eps_low, clip.eps_high) == (0.3, 0.3)
    with pytest.raises(ConfigError, match="'epsilon' sets 'eps_low'"):
        GRPOConfig(epsilon=0.1, eps_low=0.2)


@pytest.mark.parametrize("given, scale", [
    ({}, "group"), ({"scale_rewards": "group"}, "group"), ({"scale_rewards": "batch"}, "batch"),
    ({"scale_rewards": "none"}, "none"), ({"scale_rewards": True}, "group"),
    ({"scale_rewards": False}, "none"), ({"scale_by_std": True}, "group"),
    ({"scale_by_std": False}, "none")])
def test_scale_rewards_values(given, scale):
    assert GRPOConfig(**given).scale_rewards == scale
    overrides = [f"{k}={str(v).lower()}" for k, v in given.items()]
    assert load_config(GRPOConfig, None, overrides).scale_rewards == scale


def test_scale_rewards_refusals():
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        GRPOConfig(scale_rewards="global")
    with pytest.raises(ConfigError, match="deprecated form of scale_rewards"):
        GRPOConfig(scale_by_std=True, scale_rewards="batch")


def test_per_device_and_accumulation_over_processes(monkeypatch):
    # TRL: one optimiser step = per_device x processes x accumulation completions
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3)
    assert (cfg.micro_batch_size, cfg.batch_size) == (4, 24)
    rloo = RLOOConfig(per_device_train_batch_size=2, num_generations=2)
    assert (rloo.micro_batch_size, rloo.batch_size) == (2, 4)
    dpo = DPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert dpo.batch_size == 8
    ppo = PPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    num_mini_batches=2)
    assert (ppo.minibatch_size, ppo.batch_size) == (8, 16)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="also given"):
        GRPOConfig(per_device_train_batch_size=4, batch_size=16)
    with pytest.raises(ValueError, match="not divisible by group_size"):
        GRPOConfig(per_device_train_batch_size=6)  # 6 completions: not whole groups of 4
    assert GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      steps_per_generation=2, generation_batch_size=8).batch_size == 8
    with pytest.raises(ConfigError, match="steps_per_generation = 4 is not supported"):
        GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2,
                   steps_per_generation=4)


def test_max_steps_and_save_steps_count_optimiser_steps():
    cfg = GRPOConfig(max_steps=40, save_steps=20, num_iterations=2)
    assert (cfg.steps, cfg.save_every) == (20, 10)
    with pytest.raises(ConfigError, match="not a whole number of rollouts"):
        GRPOConfig(max_steps=5, num_iterations=2)
    with pytest.raises(ConfigError, match="max_steps = -1 is not supported"):
        GRPOConfig(max_steps=-1)
    assert PPOConfig(total_episodes=100).steps == 7  # ceil(100 / 16 sequences per rollout)


def test_warmup_ratio():
    # ceil(0.1 x 30 steps x 2 optimiser steps each) = 6
    assert GRPOConfig(warmup_ratio=0.1, steps=30, num_iterations=2).warmup_steps == 6
    assert GRPOConfig(warmup_ratio=0.05, max_steps=30).warmup_steps == 2  # ceil(1.5)
    assert GRPOConfig(warmup_steps=0.25, steps=10).warmup_steps == 3  # transformers 5's fraction
    assert PPOConfig(warmup_ratio=0.5, steps=2).warmup_steps == 1  # 2 rollouts x 1 minibatch
    with pytest.raises(ConfigError, match="also given"):
        GRPOConfig(warmup_ratio=0.1, warmup_steps=3)
    with pytest.raises(ConfigError, match="'warmup_ratio' is not supported"):
        DPOConfig(warmup_ratio=0.1)
    with pytest.raises(ConfigError, match=r"a number in \[0, 1\], got 2"):
        GRPOConfig(warmup_ratio=2)


def test_bf16_and_fp16():
    assert GRPOConfig(bf16=True).precision == "bf16"
    assert GRPOConfig(bf16=False).precision == "fp32"
    assert GRPOConfig(bf16=None).precision == "auto"
    assert GRPOConfig(fp16=False).precision == "auto"
    with pytest.raises(ConfigError, match="'fp16' is not supported: mogrpo computes in bf16 or"):
        GRPOConfig(fp16=True)
    with pytest.raises(ConfigError, match="also given"):
        GRPOConfig(bf16=True, precision="fp32")


def test_new_fields_and_their_checks():
    cfg = GRPOConfig(reward_weights=[1.0, 0.0], max_prompt_length=64, output_dir="runs/y")
    assert (cfg.reward_weights, cfg.max_prompt_length, cfg.output_dir) == ([1.0, 0.0], 64,
                                                                           "runs/y")
    with pytest.raises(ValueError, match="reward_weights must be >= 0"):
        GRPOConfig(reward_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="max_prompt_length = 0 must be >= 1"):
        GRPOConfig(max_prompt_length=0)
    with pytest.raises(ValueError, match="not TRL's"):
        GRPOConfig(repetition_penalty=1.1)


def test_dataclass_copies_keep_working():
    cfg = GRPOConfig(max_steps=10, num_iterations=2, per_device_train_batch_size=8)
    assert dataclasses.replace(cfg) == cfg
    assert dataclasses.replace(cfg, lr=1e-5).lr == 1e-5


def test_max_prompt_length_keeps_each_prompts_last_tokens(tiny_policy_dir):
    """As TRL truncates: the rendered prompt's last N tokens, in rollouts and in DPO's pairs."""
    import torch

    from mogrpo.models import load_policy
    from mogrpo.rl.dpo import encode_pairs
    from mogrpo.rollout import chat_texts, generate_rollout

    model, tok = load_policy(str(tiny_policy_dir), lora_r=0)
    prompts = ["how do i bake bread", "hi"]
    full = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, prompts)]
    n = min(len(x) for x in full) - 1  # shorter than every prompt: each one is cut
    ro = generate_rollout(model, tok, prompts, ["benign"] * 2, group_size=2, max_new_tokens=3,
                          max_prompt_length=n)
    assert ro.prompt_ids.shape[1] == n and bool(ro.prompt_mask.all())
    for i, ids in enumerate(full):
        assert ro.prompt_ids[2 * i].tolist() == ids[-n:]
    ids, attn, _ = encode_pairs(tok, prompts, ["yes", "no"], 4, max_prompt_length=n)
    for i, want in enumerate(full):
        assert ids[i, :n].tolist() == want[-n:] and bool(attn[i, :n].all())
    untouched = generate_rollout(model, tok, prompts, ["benign"] * 2, group_size=2,
                                 max_new_tokens=3, max_prompt_length=1000)
    assert untouched.prompt_ids.shape[1] == max(map(len, full))
    assert torch.equal(untouched.prompt_mask.sum(1)[::2], torch.tensor([len(x) for x in full]))


def test_rloo_normalize_advantages_runs(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                        tmp_path):
    """TRL's RLOO normalize_advantages: the batch's advantages whitened (mean |A| <= 1)."""
    import json
    import math

    from helpers import run_overrides

    from mogrpo.cli import main

    out = tmp_path / "rloo"
    assert main(["train", "rloo", "--output", str(out), "--quiet", *run_overrides(
        tiny_policy_dir, tiny_reward_model_dir, prompt_file, "rloo",
        normalize_advantages=True)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert math.isfinite(r["loss"]) and 0 <= r["advantage/abs_mean"] <= 1 + 1e-6

