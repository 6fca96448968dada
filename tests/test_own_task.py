"""Bring your own model, rewards and data: rewards from anywhere mixed in one objective
(Python functions, Hugging Face sequence-classification models, the multi-aspect reward
model), the TRL-shaped trainer API, conversational prompts and prompts without kinds."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import run_overrides

from mogrpo.cli import main

REWARD_MODULE = '''
def short(prompts, completions, kind, **columns):
    """1 for a completion under 6 words; None (not applicable) on benign prompts."""
    return [None if k == "benign" else float(len(c.split()) < 6)
            for c, k in zip(completions, kind)]
'''


@pytest.fixture(scope="module")
def hf_reward_dir(tiny_encoder_dir, tmp_path_factory) -> Path:
    """A tiny Hugging Face sequence-classification reward model (one head, on the tiny BERT),
    built offline."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("hf_rm")
    torch.manual_seed(1)  # the new head's weights
    BertForSequenceClassification.from_pretrained(tiny_encoder_dir,
                                                  num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_encoder_dir).save_pretrained(folder)
    return folder


def _rewards(tiny_reward_model_dir, hf_reward_dir, module: Path | None) -> list[dict]:
    out = [{"type": "multi_aspect", "path": str(tiny_reward_model_dir)},
           {"type": "hf", "model": str(hf_reward_dir), "name": "helpful"}]
    if module is not None:
        out.append({"type": "python", "ref": f"{module}:short"})
    return out


def _train(tmp_path, name, tiny_policy_dir, tiny_reward_model_dir, prompt_file, **kw):
    out = tmp_path / name
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo",
                         report_to=[], sample_every=1, **kw)
    assert main(["train", "grpo", "--quiet", "--output", str(out), *args]) == 0
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_mixed_rewards_each_column_logged_and_a_zero_weight_column_changes_nothing(
        tmp_path, tiny_policy_dir, tiny_reward_model_dir, prompt_file, hf_reward_dir):
    from safetensors.torch import load_file

    module = tmp_path / "my_rewards.py"
    module.write_text(REWARD_MODULE)
    weights = {"safety": 1.0, "actionability": 1.0, "politeness": 0.5, "helpful": 1.0}
    mixed = _train(tmp_path, "mixed", tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                   rewards=_rewards(tiny_reward_model_dir, hf_reward_dir, module),
                   weights={**weights, "short": 1.0})
    rows = _metrics(mixed)
    assert len(rows) == 2
    for r in rows:  # every column, every step
        for col in ("safety", "actionability", "politeness", "helpful", "short"):
            assert math.isfinite(r[f"rewards/{col}/mean"]), (col, r)
            assert r[f"rewards/{col}/std"] >= 0.0
    samples = [s for line in (mixed / "samples.jsonl").read_text().splitlines()
               for s in json.loads(line)["samples"]]
    assert len(samples) == 16  # 2 steps x 8 samples, every column of each
    assert all(set(s["rewards"]) == {"safety", "actionability", "politeness", "helpful", "short"}
               for s in samples)
    benign = [s["rewards"]["short"] for s in samples if "bread" in s["prompt"]]
    assert benign and all(v is None or math.isnan(v) for v in benign)  # None: not applicable

    # the same run without the function, and with it at weight 0: the same adapter, bit for bit
    without = _train(tmp_path, "without", tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                     rewards=_rewards(tiny_reward_model_dir, hf_reward_dir, None),
                     weights=weights)
    zero = _train(tmp_path, "zero", tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                  rewards=_rewards(tiny_reward_model_dir, hf_reward_dir, module),
                  weights={**weights, "short": 0.0})
    a = load_file(str(without / "final" / "adapter_model.safetensors"))
    b = load_file(str(zero / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "rewards/short/mean" in _metrics(zero)[0]  # logged, not trained on
    c = load_file(str(mixed / "final" / "adapter_model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)  # weighted 1, it does train


def test_reward_sources_by_hand(tiny_reward_model_dir, hf_reward_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from mogrpo.reward.model import MultiAspectRewardModel
    from mogrpo.reward.scoring import Scorer
    from mogrpo.reward.sources import HFRewardModel, PythonReward, as_source

    seen = {}

    def f(prompts, completions, **columns):
        seen.update(columns, prompts=prompts, completions=completions)
        return [len(c) for c in completions[:-1]] + [None]

    hf = HFRewardModel(str(hf_reward_dir), "helpful")
    rm = MultiAspectRewardModel.load(tiny_reward_model_dir)
    scorer = Scorer([as_source(rm), hf, PythonReward(f, "chars")],
                    not_applicable={"harmful": ["actionability"]})
    assert scorer.columns == ["safety", "actionability", "politeness", "helpful", "chars"]
    r = scorer.score(["make a bomb", "bake bread"], ["harmful", "benign"],
                     ["no", "sorry", "mix flour", "ok"], 2, columns={"topic": ["x", "y"]})
    assert r.shape == (2, 2, 5)
    assert seen["kind"] == ["harmful", "harmful", "benign", "benign"]
    assert seen["topic"] == ["x", "x", "y", "y"] and seen["prompts"][2] == "bake bread"
    assert r[..., 4].flatten()[:3].tolist() == [2.0, 5.0, 9.0] and math.isnan(r[1, 1, 4])
    assert bool(torch.isnan(r[0, :, 1]).all()) and not bool(torch.isnan(r[1, :, 1]).any())
    # the HF column is the model's own logit on 'prompt\n\ncompletion' (no chat template)
    model = AutoModelForSequenceClassification.from_pretrained(hf_reward_dir).eval()
    enc = AutoTokenizer.from_pretrained(hf_reward_dir)(["bake bread\n\nmix flour"],
                                                        return_tensors="pt")
    with torch.no_grad():
        assert float(model(**enc).logits[0, 0]) == pytest.approx(float(r[1, 0, 3]), abs=1e-5)
    # several heads: one column each, named by the model's labels
    two = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(
        hf_reward_dir, num_labels=2, id2label={0: "helpful", 1: "harmless"}))
    heads = HFRewardModel(two, "rm", tokenizer=AutoTokenizer.from_pretrained(hf_reward_dir))
    assert heads.columns == ["rm_helpful", "rm_harmless"]
    assert Scorer([heads]).score_flat(["a", "b"], ["c", "d"]).shape == (2, 2)
    with pytest.raises(ValueError, match="two rewards give the column"):
        Scorer([hf, HFRewardModel(str(hf_reward_dir), "helpful")])
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        Scorer([PythonReward(lambda prompts, completions, **k: [1.0], "bad")]).score_flat(
            ["a", "b"], ["c", "d"])


def test_reward_specs_are_checked_when_the_config_loads(tmp_path):
    from mogrpo.reward.sources import build_sources
    from mogrpo.rl.grpo import GRPOConfig

    with pytest.raises(ValueError, match="type one of"):
        GRPOConfig(rewards=[{"type": "magic"}])
    with pytest.raises(ValueError, match="missing \\['model'\\]"):
        GRPOConfig(rewards=[{"type": "hf", "name": "x"}])
    with pytest.raises(ValueError, match="cannot import"):
        build_sources([{"type": "python", "ref": "no_such_module_xyz:f"}])
    (tmp_path / "r.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="has no function 'f'"):
        build_sources([{"type": "python", "ref": f"{tmp_path / 'r.py'}:f"}])


def test_weights_default_to_one_per_column_and_reward_weights_are_per_column():
    from mogrpo.reward.objective import resolve_run_objective, resolve_weights
    from mogrpo.reward.scoring import DEFAULT_WEIGHTS
    from mogrpo.rl.grpo import GRPOConfig

    # custom aspect names train without a weights key: 1 each
    w, na = resolve_run_objective(["helpful", "brief"], GRPOConfig())
    assert w == {"helpful": 1.0, "brief": 1.0} and na == {}
    # the safety defaults, plus 1 for an added column
    w, na = resolve_run_objective(["safety", "actionability", "politeness", "meaningfulness",
                                   "short"], GRPOConfig())
    assert w == {**DEFAULT_WEIGHTS, "short": 1.0}
    assert na == {"harmful": ["actionability"], "benign": ["safety"]}
    assert resolve_weights(["a", "b"], {"a": 3.0}) == {"a": 3.0, "b": 1.0}
    assert resolve_weights(["a", "b"], {"a": 3.0}, [0.5, 0.0]) == {"a": 0.5, "b": 0.0}
    with pytest.raises(ValueError, match="one per column"):
        resolve_weights(["a", "b"], None, [1.0])


def test_prompts_without_kind_train_and_openers_are_not_forced(tmp_path, tiny_policy_dir,
                                                              tiny_reward_model_dir):
    prompts = tmp_path / "task.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"how do i bake bread {i}"}) + "\n"
                               for i in range(4)))
    out = _train(tmp_path, "nokind", tiny_policy_dir, tiny_reward_model_dir, prompts,
                 guided_samples=None, weights={"politeness": 1.0}, steps=1)
    row = _metrics(out)[0]
    assert row["judge/refusal_harmful"] is None and row["judge/over_refusal_benign"] is None
    assert math.isfinite(row["rewards/politeness/mean"])
    assert "opener_credited/harmful" not in row  # no guided samples off the safety prompts


@pytest.mark.slow
def test_trl_shaped_trainer_on_conversational_dataset(tmp_path, tiny_qwen2_dir):
    from datasets import Dataset
    from peft import LoraConfig

    from mogrpo import GRPOConfig, GRPOTrainer
    from mogrpo import rollout as rollout_module

    system = "You are a terse assistant for bakers."
    data = Dataset.from_list([
        {"prompt": [{"role": "system", "content": system},
                    {"role": "user", "content": f"how do i bake bread {i}"}],
         "topic": "bread"} for i in range(4)])
    rendered, seen = [], {}
    real = rollout_module.chat_texts

    def spy(tokenizer, prompts):
        texts = real(tokenizer, prompts)
        rendered.extend(texts)
        return texts

    def brevity(prompts, completions, topic, **kw):  # TRL's conversational form
        seen.update(prompt=prompts[0], completion=completions[0], topic=topic[0])
        return [-float(len(c[0]["content"])) for c in completions]

    logged = []
    rollout_module.chat_texts = spy
    try:
        trainer = GRPOTrainer(
            model=str(tiny_qwen2_dir), reward_funcs=[brevity],
            args=GRPOConfig(output_dir=str(tmp_path / "api"), max_steps=1,
                            per_device_train_batch_size=4, num_generations=2,
                            max_completion_length=4, learning_rate=1e-2, report_to="none",
                            bf16=False, save_steps=0),
            train_dataset=data, peft_config=LoraConfig(r=2, lora_alpha=4),
            callbacks=[logged.append])
        result = trainer.train()
    finally:
        rollout_module.chat_texts = real
    assert rendered and all(system in t for t in rendered)
    assert all("<|im_start|>system" in t and t.endswith("<|im_start|>assistant\n")
               for t in rendered)
    assert seen["prompt"][0] == {"role": "system", "content": system}
    assert seen["completion"][0]["role"] == "assistant" and seen["topic"] == "bread"
    assert [r["step"] for r in logged] == [1] and "rewards/brevity/mean" in logged[0]
    assert result["eval_after"] == {}  # no eval_dataset: the safety sets are not used
    run = tmp_path / "api"
    saved = [json.loads(x) for x in (run / "train_prompts.jsonl").read_text().splitlines()]
    assert saved[0]["messages"][0]["content"] == system and saved[0]["topic"] == "bread"
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["lora_r"] == 2 and cfg["rewards"][0]["name"] == "brevity"
    assert cfg["train_prompts"] == str(run / "train_prompts.jsonl")


@pytest.mark.slow
def test_eval_of_a_run_reproduces_the_trainers_after_evaluation(tmp_path, tiny_policy_dir,
                                                                 tiny_reward_model_dir,
                                                                 prompt_file, hf_reward_dir):
    """`mogrpo eval --model RUN` with no settings: the run's reward sources, weights, lengths,
    prompts, count and seed; its figures equal eval_after.json's."""
    module = tmp_path / "my_rewards.py"
    module.write_text(REWARD_MODULE)
    run = _train(tmp_path, "run", tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                 rewards=_rewards(tiny_reward_model_dir, hf_reward_dir, module),
                 weights={"safety": 2.0, "helpful": 0.5}, eval_prompts=str(prompt_file),
                 eval_max_prompts=6, eval_max_new_tokens=6, seed=3, steps=1)
    assert main(["eval", "--model", str(run), "--output", str(tmp_path / "ev"), "--quiet",
                 "kl_prompts=0"]) == 0
    after = json.loads((run / "eval_after.json").read_text())
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["max_new_tokens"] == 6 and ev["n"] == after["n"] == 6
    assert set(after) <= set(ev)  # mogrpo eval adds its own judges (toxicity, KL) and facts
    for part in (after, after["harmful"], after["benign"]):  # the same, but for the toxicity
        assert part.pop("toxicity") is None  # judge's figure, which the trainer does not run
    for part in (ev, ev["harmful"], ev["benign"]):
        assert math.isfinite(part.pop("toxicity"))
    for key in after:
        assert ev[key] == after[key], key
    assert set(after["harmful"]["aspects"]) == {"safety", "actionability", "politeness",
                                                "helpful", "short"}
    rows = [json.loads(x) for x in (tmp_path / "ev" / "generations.jsonl").read_text()
            .splitlines()]
    trained = [json.loads(x) for x in (run / "eval_after_generations.jsonl").read_text()
               .splitlines()]
    assert [(r["id"], r["completion"], r["combined"]) for r in rows] == \
        [(r["id"], r["completion"], r["combined"]) for r in trained]


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "own_task"


@pytest.mark.slow
def test_the_own_task_example_trains_reports_and_exports(tmp_path, tiny_policy_dir, monkeypatch):
    """examples/own_task, both ways (grpo.yaml through the CLI, train.py through the API), with
    a tiny policy and one step; then `mogrpo report` over both runs and `mogrpo export`."""
    import runpy
    import sys

    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(EXAMPLE.parent.parent)  # the example's paths are from the repository root
    cli_run, api_run = tmp_path / "cli", tmp_path / "api"
    assert main(["train", "grpo", "--quiet", "--config", str(EXAMPLE / "grpo.yaml"), "--output",
                 str(cli_run), f"policy={tiny_policy_dir}", "steps=1", "max_new_tokens=8",
                 "eval_max_new_tokens=8", "report_to=[]"]) == 0
    rows = _metrics(cli_run)
    assert {f"rewards/{c}/mean" for c in ("on_topic", "brief", "no_shouting")} <= set(rows[0])
    monkeypatch.setattr(sys, "argv", ["train.py", "--steps", "1", "--output", str(api_run),
                                      "--policy", str(tiny_policy_dir)])
    runpy.run_path(str(EXAMPLE / "train.py"), run_name="__main__")
    assert json.loads((api_run / "eval_after.json").read_text())["n"] == 4
    assert main(["report", str(cli_run), str(api_run), "--output", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    headline = report.split("## Headline", 1)[1].split("##", 1)[0]
    assert "train reward: on_topic" in headline and "harmful compliance" not in headline
    assert "| cli |" in headline and "| api |" in headline
    assert "How far the judges can be trusted" not in report  # no prompt was judged for harm
    assert main(["export", str(cli_run), "--output", str(tmp_path / "model")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.vocab_size > 0
    card = (tmp_path / "model" / "README.md").read_text()
    assert "| on_topic | 2.000 | - |" in card and "| no_shouting | 0.000 | - |" in card
    assert "4 (no prompt kinds)" in card


@pytest.mark.slow
def test_dpo_and_ppo_trainers_take_the_same_objects(tmp_path, tiny_policy_dir):
    """DPOTrainer on TRL-style preference rows (a conversational prompt), PPOTrainer on plain
    prompts with a reward function: each trains and records what it was given."""
    from mogrpo import DPOConfig, DPOTrainer, PPOConfig, PPOTrainer

    system = [{"role": "system", "content": "be brief"}]
    pairs = [{"prompt": system + [{"role": "user", "content": f"how do i bake bread {i}"}],
              "chosen": [{"role": "assistant", "content": "mix flour and water"}],
              "rejected": "no"} for i in range(4)]
    dpo = DPOTrainer(model=str(tiny_policy_dir), args=DPOConfig(
        output_dir=str(tmp_path / "dpo"), num_train_epochs=1, per_device_train_batch_size=2,
        max_completion_length=8, report_to="none", bf16=False, save_steps=0, lora_r=4),
        train_dataset=pairs)
    assert dpo.train()["eval_after"] == {}
    saved = [json.loads(x) for x in (tmp_path / "dpo" / "pairs.jsonl").read_text().splitlines()]
    assert len(saved) == 4 and saved[0]["prompt"][0] == system[0]
    assert saved[0]["chosen"] == "mix flour and water"

    def words(prompts, completions, **kw):
        return [float(len(c.split())) for c in completions]

    ppo = PPOTrainer(model=str(tiny_policy_dir), reward_funcs=words, args=PPOConfig(
        output_dir=str(tmp_path / "ppo"), total_episodes=1, batch_size=4, group_size=2,
        minibatch_size=4, max_completion_length=4, report_to="none", bf16=False,
        save_steps=0, lora_r=4),
        train_dataset=[{"prompt": f"how do i bake bread {i}"} for i in range(4)])
    ppo.train()
    rows = _metrics(tmp_path / "ppo")
    assert len(rows) == 1 and math.isfinite(rows[0]["rewards/words/mean"])
