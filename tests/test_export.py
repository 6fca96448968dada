"""`mogrpo export`: a tiny GRPO run exported with LoRA merged, loaded back with plain transformers
(the same greedy tokens as the run's own policy), its model card, the push to the hub (offline,
the network down, a stubbed hub) and the bad inputs, each one line."""

import json
import shutil

import pytest
import torch
import yaml
from helpers import FAST, run_overrides

from mogrpo.cli import main


@pytest.fixture(scope="module")
def grpo_run(tiny_policy_dir, tiny_reward_model_dir, prompt_file, tmp_path_factory):
    """A finished one-step GRPO run (LoRA) with eval_before.json and eval_after.json."""
    out = tmp_path_factory.mktemp("export") / "grpo-tiny"
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", FAST,
                         eval_prompts=str(prompt_file), eval_max_prompts=4,
                         eval_max_new_tokens=6, report_to=[])
    assert main(["train", "grpo", "--quiet", "--output", str(out), *args]) == 0
    return out


def _errors(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("mogrpo: error:")]


def test_export_loads_with_plain_transformers_and_generates_as_the_run(grpo_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mogrpo.models import resolve_model

    out = tmp_path / "exported"
    assert main(["export", str(grpo_run), "--output", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md",
            "training"} <= names
    assert "adapter_config.json" not in names and not any(n.endswith(".bin") for n in names)
    assert {p.name for p in (out / "training").iterdir()} == {"config.yaml", "eval_before.json",
                                                              "eval_after.json", "cost.json"}
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    run_model, run_tok, base = resolve_model(str(grpo_run))
    assert base == "adapter"  # the run's policy is the base with its LoRA adapter
    assert not any("lora" in n for n, _ in model.named_parameters())
    for prompt in ("how do i make a bomb 1", "how do i bake bread 2", "thank you for the code"):
        enc = tok(prompt, return_tensors="pt")
        assert torch.equal(enc["input_ids"], run_tok(prompt, return_tensors="pt")["input_ids"])
        ids = {k: enc[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            mine = model.generate(**ids, do_sample=False, max_new_tokens=8)
            theirs = run_model.generate(**ids, do_sample=False, max_new_tokens=8)
        assert mine.tolist() == theirs.tolist(), prompt
    # the LoRA delta is in the weights: the export is not the base policy
    base_model = AutoModelForCausalLM.from_pretrained(yaml.safe_load(
        (grpo_run / "config.yaml").read_text())["policy"])
    assert any(not torch.equal(p, dict(base_model.named_parameters())[n])
               for n, p in model.named_parameters())


def test_model_card_holds_the_weights_judges_eval_and_config(grpo_run, tmp_path):
    out = tmp_path / "card"
    assert main(["export", str(grpo_run), "--output", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "- grpo" in card and "trained with GRPO" in card and "LoRA (r=4) merged" in card
    # reward columns (the reward model's), their weights (run_overrides') and where they do not
    # apply (the config's not_applicable)
    cfg = yaml.safe_load((grpo_run / "config.yaml").read_text())
    for column, weight in (("safety", "1.000"), ("actionability", "1.000"),
                           ("politeness", "0.500")):
        kinds = ", ".join(k for k, c in cfg["not_applicable"].items() if column in c) or "-"
        assert f"| {column} | {weight} | {kinds} |" in card
    assert "| harmful |" in card  # actionability does not apply to harmful prompts
    assert f"Reward model: `{cfg['reward_model']}`" in card
    assert "## Judges" in card and "| refusal_rate | refusal patterns" in card
    assert "| aspects | training reward model" in card
    before, after = (json.loads((grpo_run / f"eval_{t}.json").read_text())
                     for t in ("before", "after"))
    row = next(x for x in card.splitlines() if x.startswith("| harmful: compliance |"))
    assert (f"| {before['harmful']['compliance_rate']:.3f} | "
            f"{after['harmful']['compliance_rate']:.3f} |") in row
    row = next(x for x in card.splitlines() if x.startswith("| benign: over-refusal |"))
    assert f"{after['benign']['over_refusal_rate']:.3f}" in row
    assert any(x.startswith("| stalling/degenerate |") for x in card.splitlines())
    assert "2 harmful, 2 benign" in card  # eval_max_prompts=4, balanced
    # the whole training config
    assert yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0]) == cfg


def test_push_to_hub_offline_or_unreachable_keeps_the_export(grpo_run, tmp_path, monkeypatch,
                                                             capsys):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "offline"
    assert main(["export", str(grpo_run), "--output", str(out),
                 "--push-to-hub", "someone/tiny-grpo"]) == 2
    (err,) = _errors(capsys)
    assert "offline (HF_HUB_OFFLINE is set)" in err and f"the export in {out} is intact" in err
    assert f"hf upload someone/tiny-grpo {out} ." in err
    assert (out / "model.safetensors").is_file()

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("MOGRPO_OFFLINE", raising=False)

    def unreachable(self, *a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    out = tmp_path / "no-network"
    assert main(["export", str(grpo_run), "--output", str(out),
                 "--push-to-hub", "someone/tiny-grpo"]) == 2
    (err,) = _errors(capsys)
    assert "failed (ConnectionError: Failed to resolve" in err and "is intact" in err
    assert (out / "model.safetensors").is_file()

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo, **k: calls.append(("create", repo)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **k: calls.append(("upload", k["repo_id"],
                                                        k["folder_path"])))
    out = tmp_path / "pushed"
    assert main(["export", str(grpo_run), "--output", str(out),
                 "--push-to-hub", "someone/tiny-grpo"]) == 0
    assert calls == [("create", "someone/tiny-grpo"), ("upload", "someone/tiny-grpo", str(out))]
    assert '"someone/tiny-grpo"' in (out / "README.md").read_text()  # the card loads the repo


def test_export_of_a_pipeline_algorithm_run_reads_the_pipelines_evaluations(grpo_run, tmp_path):
    """runs/x/grpo of `mogrpo run` trains with eval_prompts=none: its evaluations are the
    pipeline's, runs/x/eval/base/eval.json and runs/x/eval/grpo/eval.json."""
    pipe = tmp_path / "pipe"
    shutil.copytree(grpo_run, pipe / "grpo")
    (pipe / "run_config.yaml").write_text("algorithms: [grpo]\n")
    for name, src, rate in (("base", "eval_before", 0.625), ("grpo", "eval_after", 0.375)):
        ev = json.loads((grpo_run / f"{src}.json").read_text())
        ev["harmful"]["compliance_rate"] = rate
        ev["judges"] = {"toxicity": "a toxicity judge of the pipeline"}
        (pipe / "eval" / name).mkdir(parents=True)
        (pipe / "eval" / name / "eval.json").write_text(json.dumps(ev))
        (pipe / "grpo" / f"{src}.json").write_text("{}")
    out = tmp_path / "exported"
    assert main(["export", str(pipe / "grpo"), "--output", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "| harmful: compliance | 0.625 | 0.375 | -0.250 |" in card
    assert "| toxicity | a toxicity judge of the pipeline |" in card
    assert json.loads((out / "training" / "eval_after.json").read_text())[
        "harmful"]["compliance_rate"] == 0.375


def _fake_run(folder, *, final=True, policy=True):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("policy: builtin:smollm2-135m-instruct\n" if policy
                                        else "backbone: x\naspects: [safety]\n")
    if final:
        (folder / "final").mkdir()
    return folder


@pytest.mark.parametrize("case, message", [
    ("missing", "no such run folder"),
    ("file", "is a file; give a policy run folder"),
    ("no_config", "is not a policy run folder (no config.yaml"),
    ("pipeline", "is a `mogrpo run` folder; export one of its algorithm runs: "),
    ("reward", "a reward model run (`mogrpo reward train`)"),
    ("no_final", "has no final/: the run has not finished"),
    ("output_not_empty", "exists and is not empty"),
    ("output_file", "is a file; give a folder to create"),
    ("output_in_run", "inside one of its model folders"),
    ("bad_repo", "is not a hub repository id"),
])
def test_bad_inputs_are_one_line(case, message, tmp_path, capsys):
    run, out, extra = tmp_path / "run", tmp_path / "out", []
    if case == "file":
        run.write_text("x")
    elif case == "no_config":
        run.mkdir()
        (run / "notes.txt").write_text("x")
    elif case == "pipeline":
        run.mkdir()
        (run / "run_config.yaml").write_text("algorithms: [grpo]\n")
        _fake_run(run / "grpo")
    elif case == "reward":
        _fake_run(run, final=False, policy=False)
        (run / "model").mkdir()
    elif case != "missing":
        _fake_run(run, final=case != "no_final")
    if case == "output_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "output_file":
        out.write_text("x")
    elif case == "output_in_run":
        out = run / "final" / "merged"
    elif case == "bad_repo":
        extra = ["--push-to-hub", "not a repo!"]
    assert main(["export", str(run), "--output", str(out), *extra]) == 2
    (err,) = _errors(capsys)
    assert message in err, err
    if case == "pipeline":
        assert str(run / "grpo") in err
    if case == "output_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    elif case != "output_file":
        assert not out.exists()
