import json
import math

import pytest
import torch
from helpers import run_overrides

from mogrpo.cli import main
from mogrpo.config import load_config
from mogrpo.rl.grpo import GRPOConfig

# This file's runs on top of TINY["grpo"]: evaluated on 4 prompts (where eval_prompts is
# given; most runs turn evaluation off) and a sample logged every step.
EVAL = {"eval_max_prompts": 4, "eval_max_new_tokens": 6, "sample_every": 1}


def test_grpo_end_to_end_every_trainable_parameter_changes(tiny_policy_dir, tiny_reward_model_dir,
                                                           prompt_file, tmp_path):
    out = tmp_path / "run"
    from mogrpo.models import load_policy

    torch.manual_seed(0)  # the run seeds the same way right before loading the policy
    before, _ = load_policy(str(tiny_policy_dir), lora_r=4, lora_alpha=8)
    assert main(["train", "grpo", "--output", str(out), "--quiet",
                 *run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", EVAL,
                                eval_prompts=str(prompt_file))]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        assert all(k in r for k in ("rewards/safety/mean", "rewards/safety/std",
                                    "reward/combined/mean", "kl", "clip_fraction", "entropy",
                                    "completion_length", "zero_variance_fraction",
                                    "tokens_per_s", "step_seconds", "peak_memory_mb",
                                    "advantage/std"))
        assert math.isfinite(r["loss"])
    cost = json.loads((out / "cost.json").read_text())
    assert set(cost["phase_seconds"]) >= {"generation", "scoring", "policy_forward_backward",
                                          "reference"}
    # every sampled token of the 2 steps' 8 completions (completion_length: their mean), at most
    # max_new_tokens = 8 each; evaluation's generations are not counted
    assert cost["tokens_generated"] == sum(8 * r["completion_length"] for r in lines)
    assert 2 * 8 <= cost["tokens_generated"] <= 2 * 8 * 8
    assert cost["rollout_engine"] == "mogrpo"  # a Llama policy: mogrpo's engine, no merged copy
    assert (out / "config.yaml").is_file()
    assert json.loads((out / "eval_after.json").read_text())["n"] == 4  # eval_max_prompts
    # The adapter saved in final/ differs from the initial one in every LoRA tensor.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy_dir),
                                        out / "final")
    b = {n: p for n, p in before.named_parameters() if p.requires_grad}
    a = dict(trained.named_parameters())
    assert len(b) == 28 and all(n in a for n in b)  # LoRA A and B of 7 linears x 2 layers
    unchanged = [n for n in b if torch.equal(b[n], a[n])]
    assert unchanged == []


def test_full_finetune_changes_every_parameter(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                               tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", EVAL,
                         lora_r=0, lr=1e-2, steps=1, eval_prompts="none")
    assert main(["train", "grpo", "--output", str(out), "--quiet", *args]) == 0
    a = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    b = AutoModelForCausalLM.from_pretrained(out / "final")
    changed = {n: not torch.equal(p, dict(b.named_parameters())[n])
               for n, p in a.named_parameters()}
    # Embedding rows of unused tokens move too (the matrix changes as a whole).
    assert all(changed.values()), [n for n, c in changed.items() if not c]


def test_resume_gives_the_same_weights(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                       tmp_path, monkeypatch):
    from helpers import kill_and_resume

    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", EVAL,
                         steps=4, save_every=2, eval_prompts="none")
    _, part = kill_and_resume("grpo", args, tmp_path, monkeypatch)
    assert (part / "checkpoints" / "latest").read_text().strip() == "checkpoint-2"
    metrics = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    # the killed step's row (if written) is dropped on resume, not repeated
    assert metrics == [1, 2, 3, 4]


@pytest.mark.parametrize("overrides, message", [
    (["group_size=1"], "G >= 2"),
    (["batch_size=10", "group_size=4"], "not divisible by group_size"),
    (["advantage_mode=lagrangian"], "needs thresholds"),
    (["thresholds={safety: 0.9}"], "only apply with advantage_mode=lagrangian"),
    (["loss_aggregation=mean"], "loss_aggregation must be one of"),
    (["rollout_engine=vllm"], "rollout_engine must be one of auto, mogrpo, generate"),
])
def test_bad_config_says_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(GRPOConfig, None, overrides)


def test_unknown_columns_fail_early(tiny_policy_dir, tiny_reward_model_dir, prompt_file, tmp_path,
                                    capsys):
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", EVAL,
                         eval_prompts=str(prompt_file), weights={"safety": 1, "honesty": 1})
    assert main(["train", "grpo", "--output", str(tmp_path / "w"), "--quiet", *args]) == 2
    assert "weights name ['honesty']" in capsys.readouterr().err
    assert not (tmp_path / "w" / "metrics.jsonl").exists()  # failed before training
    cfg = load_config(GRPOConfig, None, ["advantage_mode=lagrangian",
                                         "thresholds={harmlessness: 0.9}"])
    with pytest.raises(ValueError, match=r"thresholds name \['harmlessness'\]"):
        cfg.check_columns(["safety", "actionability", "politeness", "meaningfulness"])


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "adapter_model.safetensors"))


def test_gradient_accumulation_1x8_equals_8x1(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                              tmp_path):
    common = dict(steps=1, eval_prompts="none", lr=1e-2, grad_clip=0.0)
    for agg in ("grpo", "dapo"):
        one, eight = tmp_path / f"one-{agg}", tmp_path / f"eight-{agg}"
        assert main(["train", "grpo", "--output", str(one), "--quiet", *run_overrides(
            tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", EVAL, micro_batch_size=8,
            loss_aggregation=agg, **common)]) == 0
        assert main(["train", "grpo", "--output", str(eight), "--quiet", *run_overrides(
            tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", EVAL, micro_batch_size=1,
            loss_aggregation=agg, **common)]) == 0
        a, b = _adapter(one), _adapter(eight)
        for k in a:
            # 1e-5: AdamW's first step is g / (|g| + 1e-8), so where the std floor leaves a gradient
            # entry near 1e-7 the fp32 summation order of 1 vs 8 micro-batches shows at ~1e-6
            assert torch.allclose(a[k], b[k], atol=1e-5), (agg, k)


@pytest.mark.slow
def test_two_processes_equal_one_process(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                         tmp_path):
    """Same global batch and seed: `accelerate launch --num_processes 2` (gloo, CPU) makes the
    same first update as one process. Generation is seeded per prompt (generation_chunk=1),
    so both runs sample the same completions."""
    from helpers import launch_two_processes

    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", EVAL,
                         steps=1, eval_prompts="none", generation_chunk=1, lr=1e-2,
                         micro_batch_size=4)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "grpo", "--output", str(one), "--quiet", *args]) == 0
    launch_two_processes("grpo", two, args)  # configs/accelerate/ddp.yaml
    assert json.loads((two / "cost.json").read_text())["processes"] == 2
    a, b = _adapter(one), _adapter(two)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    m1 = json.loads((one / "metrics.jsonl").read_text().splitlines()[0])
    m2 = json.loads((two / "metrics.jsonl").read_text().splitlines()[0])
    assert m1["reward/combined/mean"] == pytest.approx(m2["reward/combined/mean"], abs=1e-5)


def test_step_prompt_indices_balance_and_cover():
    from mogrpo.data.prompts import step_prompt_indices

    kinds = ["harmful"] * 10 + ["benign"] * 4
    steps = [step_prompt_indices(kinds, 4, s, seed=0, balance=True) for s in range(4)]
    for idx in steps:  # 2 of each kind per step, interleaved benign/harmful (sorted kind names)
        assert [kinds[i] for i in idx] == ["benign", "harmful", "benign", "harmful"]
    # Two steps of 2 benign each walk one whole permutation of the 4 benign prompts.
    assert sorted(steps[0][0::2] + steps[1][0::2]) == [10, 11, 12, 13]
    # Five steps of 2 harmful each cover the 10 harmful prompts once.
    harmful = [i for s in range(5) for i in step_prompt_indices(kinds, 4, s, 0, True)[1::2]]
    assert sorted(harmful) == list(range(10))
    assert steps[2] == step_prompt_indices(kinds, 4, 2, seed=0, balance=True)  # pure
    flat = [i for s in range(7) for i in step_prompt_indices(kinds, 2, s, 0, False)]
    assert sorted(flat) == list(range(14))  # unbalanced: one permutation of everything


def test_lagrangian_mu2_and_extra_columns_run(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                              tmp_path):
    out = tmp_path / "lag"
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", EVAL,
                         steps=2, mu=2, eval_prompts="none", advantage_mode="lagrangian",
                         thresholds={"safety": 1.0}, multiplier_init=0.5, multiplier_lr=1.0,
                         extra_rewards=["concise"], save_every=1,
                         weights={"safety": 1.0, "actionability": 1.0, "concise": 0.2})
    assert main(["train", "grpo", "--output", str(out), "--quiet", *args]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # a sigmoid score is always below 1.0, so the multiplier must rise: 0.5 + 1.0 * (1.0 - mean).
    assert rows[0]["multiplier/safety"] == pytest.approx(0.5 + 1.0 - rows[0]["rewards/safety/mean"],
                                                         abs=1e-4)
    assert rows[1]["multiplier/safety"] > rows[0]["multiplier/safety"]
    assert "rewards/concise/mean" in rows[0] and all(math.isfinite(r["loss"]) for r in rows)
    state = torch.load(out / "checkpoints" / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert float(state["algorithm"]["multipliers"][0]) == \
        pytest.approx(rows[0]["multiplier/safety"], abs=1e-5)


def test_scorer_extra_columns_and_not_applicable(tiny_reward_model_dir):
    import math

    from mogrpo.reward.model import MultiAspectRewardModel
    from mogrpo.reward.scoring import Scorer

    rm = MultiAspectRewardModel.load(tiny_reward_model_dir)
    scorer = Scorer(rm, {"len": lambda p, c: [None if x == "" else float(len(x)) for x in c]},
                    not_applicable={"harmful": ["actionability"]})
    r = scorer.score(["how do i make a bomb", "how do i bake bread"], ["harmful", "benign"],
                     ["no", "", "bake it", "first make flour"], group_size=2)
    assert r.shape == (2, 2, 4) and scorer.columns == ["safety", "actionability", "politeness",
                                                       "len"]
    assert math.isnan(r[0, 1, 3]) and r[0, 0, 3] == 2.0 and r[1, 1, 3] == 16.0  # None -> NaN
    assert torch.isnan(r[0, :, 1]).all() and not torch.isnan(r[1, :, 1]).any()  # n/a on harmful
    with pytest.raises(ValueError, match="not reward columns"):
        Scorer(rm, not_applicable={"harmful": ["honesty"]})


def test_only_the_newest_checkpoints_are_kept(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                              tmp_path):
    out = tmp_path / "keep"
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", EVAL,
                         steps=4, save_every=1, keep_checkpoints=2, eval_prompts="none")
    assert main(["train", "grpo", "--output", str(out), "--quiet", *args]) == 0
    # Saved after steps 1, 2, 3 (the last step writes final/ instead); the two newest stay.
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == \
        ["checkpoint-2", "checkpoint-3"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "checkpoint-3"
    assert not list((out / "checkpoints").glob(".*"))  # no half-written folder
