"""`mogrpo export RUN --output DIR [--push-to-hub REPO]`: a trained policy as a folder anyone
loads with plain transformers (`AutoModelForCausalLM.from_pretrained(DIR)`), and optionally on
the Hugging Face hub.

RUN is a policy run folder (`mogrpo train ALGO ... --output RUN`, or a `mogrpo run` folder's
algorithm run such as runs/x/grpo). Its final/ (a PEFT LoRA adapter on the base policy, or a
full model when lora_r=0) is loaded as `mogrpo eval` loads it (models.resolve_model), the
adapters are merged in (peft merge_and_unload), and DIR gets the weights as safetensors (in the
run's `policy_dtype`), the tokenizer, the generation config, a model card (README.md: the
training config, the reward columns and weights, the judges, the evaluation before and after
training) and the run's own files under training/ (config.yaml, cost.json, eval_before.json,
eval_after.json: for a `mogrpo run` folder's algorithm run, the pipeline's evaluations of the
base policy and of the run). DIR appears whole or not at all (config.atomic_folder).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mogrpo.report.rows import HEADLINE, INDEPENDENT, SET_RATES, SHAPE, model_row
from mogrpo.report.write import run_evaluation

# copied into DIR/training/ when the run has them (and its evaluations, see _write)
RUN_FILES = ("config.yaml", "cost.json")
# builtin policies: the hub model they are (the card's base_model)
BUILTIN_HUB_IDS = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
OFFLINE_VARS = ("MOGRPO_OFFLINE", "HF_HUB_OFFLINE")


class ExportError(ValueError):
    """A bad export input or a failed push; one line that says what to do."""


def _kind(run: Path) -> str | None:
    """The kind of run its .mogrpo marker names ("train grpo", "reward train", "run", ...)."""
    from mogrpo.runfolder import marker_kind, read_marker

    try:
        return marker_kind(read_marker(run))
    except OSError:
        return None


def check_run(run: Path) -> dict:
    """The run's config.yaml, after checking that `run` is a finished policy run folder."""
    import yaml

    if not run.exists():
        raise ExportError(f"{run}: no such run folder")
    if not run.is_dir():
        raise ExportError(f"{run} is a file; give a policy run folder (mogrpo train ALGO "
                          f"--output RUN)")
    if (run / "run_config.yaml").is_file() or _kind(run) in ("run", "sweep"):
        algos = sorted(p.name for p in run.iterdir() if (p / "final").is_dir())
        raise ExportError(f"{run} is a `mogrpo run` folder; export one of its algorithm runs"
                          + (f": {', '.join(str(run / a) for a in algos)}" if algos else
                             " (none is finished yet)"))
    if not (run / "config.yaml").is_file():
        raise ExportError(f"{run} is not a policy run folder (no config.yaml; made by "
                          f"`mogrpo train ALGO --output RUN`)")
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ExportError(f"{run}/config.yaml does not parse ({exc.__class__.__name__})") from None
    if not isinstance(cfg, dict) or "policy" not in cfg:
        what = ("a reward model run (`mogrpo reward train`): its model is RUN/model"
                if (run / "model").is_dir() or _kind(run) == "reward train"
                else "not a policy run's config (no 'policy' key)")
        raise ExportError(f"{run}: {what}; export takes a policy run (mogrpo train ALGO)")
    if not (run / "final").is_dir():
        algo = (_kind(run) or "train ALGO").removeprefix("train ")
        raise ExportError(f"{run} has no final/: the run has not finished; continue it with "
                          f"`mogrpo train {algo} ... --output {run} --resume`, then export")
    return cfg


def check_output(out: Path, run: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--output {out} is a file; give a folder to create")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--output {out} exists and is not empty; choose a new folder (or "
                          f"remove it)")
    r, o = run.resolve(), out.resolve()
    if o == r or any(d == o or d in o.parents
                     for d in (r / "final", r / "best", r / "checkpoints")):
        raise ExportError(f"--output {out} is the run's own folder or inside one of its model "
                          f"folders; choose a folder outside {run}")


def offline() -> str | None:
    """The variable that forbids the network (MOGRPO_OFFLINE, HF_HUB_OFFLINE), if one is set."""
    return next((v for v in OFFLINE_VARS
                 if os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no", "off")),
                None)


def _check_repo_id(repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ExportError(f"--push-to-hub {repo!r} is not a hub repository id (user/name or "
                          f"org/name)") from None


def export_run(run: str | os.PathLike, output: str | os.PathLike, *,
               push_to_hub: str | None = None, cache_dir: str | None = None,
               log=print) -> dict:
    """Export the policy of run folder `run` to `output` (see the module docstring); with
    `push_to_hub`, upload it to that hub repository. Returns {output, merged_lora, dtype,
    files, url (when pushed)}."""
    run, out = Path(run), Path(output)
    cfg = check_run(run)
    check_output(out, run)
    if push_to_hub:
        _check_repo_id(push_to_hub)
    model, tok, merged = _load_merged(run, cfg, cache_dir or cfg.get("cache_dir"))
    card = model_card(run, cfg, name=push_to_hub or str(out), merged=merged)
    _write(out, run, model, tok, card)
    result = {"output": str(out), "merged_lora": merged, "dtype": str(model.dtype),
              "files": sorted(p.name for p in out.iterdir())}
    log(f"exported {run} -> {out} ({'LoRA merged, ' if merged else ''}"
        f"{str(model.dtype).replace('torch.', '')} safetensors, tokenizer, model card)")
    if push_to_hub:
        result["url"] = push(out, push_to_hub, log=log)
    return result


def _write(out: Path, run: Path, model, tok, card: str) -> None:
    """DIR, whole or not at all: a failed write (a full disk) is one line, nothing kept."""
    from mogrpo.config import atomic_folder
    from mogrpo.runfolder import first_line

    try:
        with atomic_folder(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            if not (tmp / "generation_config.json").is_file():
                model.generation_config.save_pretrained(tmp)
            (tmp / "README.md").write_text(card, encoding="utf-8")
            (tmp / "training").mkdir()
            for f in RUN_FILES:
                if (run / f).is_file():
                    shutil.copy2(run / f, tmp / "training" / f)
            for tag, f in run_evaluation(run).items():
                if tag in ("before", "after") and f is not None:
                    shutil.copy2(f, tmp / "training" / f"eval_{tag}.json")
    except Exception as exc:
        if not isinstance(exc, (OSError, RuntimeError)) and type(exc).__name__ != "SafetensorError":
            raise
        raise ExportError(f"writing {out} failed ({first_line(exc)}); nothing half-written was "
                          f"kept: free disk space, then export again") from None


def _load_merged(run: Path, cfg: dict, cache):
    """(model, tokenizer, whether LoRA was merged): final/ loaded as `mogrpo eval` loads it,
    adapters merged, in the run's policy_dtype."""
    import torch

    from mogrpo.models import is_peft, resolve_model

    model, tok, _ = resolve_model(str(run), cache)
    merged = is_peft(model)
    if merged:
        model = model.merge_and_unload()
    if cfg.get("policy_dtype") == "bf16":
        model = model.to(torch.bfloat16)
    model.eval()
    return model, tok, merged


def push(folder: Path, repo: str, *, log=print) -> str:
    """Upload `folder` to the hub model repository `repo` (created if missing); its URL. When
    offline or the hub cannot be reached, one ExportError line: the folder is intact, and how
    to push it later."""
    later = (f"the export in {folder} is intact; push it later with `hf upload {repo} {folder} .` "
             f"(or huggingface_hub.upload_folder(repo_id={repo!r}, folder_path={str(folder)!r}))")
    var = offline()
    if var:
        raise ExportError(f"--push-to-hub {repo}: offline ({var} is set), nothing was uploaded; "
                          f"{later}")
    from huggingface_hub import HfApi

    from mogrpo.runfolder import first_line

    try:
        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                 commit_message="mogrpo export")
    except Exception as exc:  # the network, the login, the hub: each is one line
        raise ExportError(f"--push-to-hub {repo} failed ({type(exc).__name__}: "
                          f"{first_line(exc)[:200]}; offline, or not logged in: `hf auth login`); "
                          f"{later}") from None
    url = str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")
    log(f"pushed {folder} to {url}")
    return url


# ----------------------------------------------------------------------------- the model card


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def eval_table(before: dict | None, after: dict | None) -> list[str]:
    """| metric | base policy | this model | change | of the metrics the evaluations hold (report
    rows' keys and labels; a metric neither holds is left out)."""
    rows = {"before": model_row(before) if before else {},
            "after": model_row(after) if after else {}}
    labels = {k: lab for k, lab, _ in HEADLINE + INDEPENDENT + SHAPE}
    rates = list(SET_RATES)
    sets = sorted({k for r in rows.values() for k in r if k.startswith("set/")},
                  key=lambda k: (k.rsplit("/", 1)[0], rates.index(k.rsplit("/", 1)[1])
                                 if k.rsplit("/", 1)[1] in rates else len(rates)))
    for k in sets:
        labels[k] = f"{k[4:].rsplit('/', 1)[0]}: {SET_RATES.get(k.rsplit('/', 1)[1], k)}"
    rm = [("rm/harmful_safety", "train RM: harmful safety"),
          ("rm/benign_actionability", "train RM: benign actionability"),
          ("rm/combined", "train RM: combined (the training signal)"),
          ("eval_rm/combined", "eval RM: combined")]
    labels.update(rm)
    order = ([k for k, _, _ in INDEPENDENT] + sets + ["probe_gap"]
             + [k for k, _, _ in SHAPE] + [k for k, _ in rm])
    out = ["| metric | base policy (eval_before) | this model (eval_after) | change |",
           "|---|---|---|---|"]
    for k in order:
        b, a = rows["before"].get(k), rows["after"].get(k)
        if b is None and a is None:
            continue
        change = f"{a - b:+.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            else "n/a"
        out.append(f"| {labels[k]} | {_fmt(b)} | {_fmt(a)} | {change} |")
    return out if len(out) > 2 else []


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def model_card(run: Path, cfg: dict, *, name: str, merged: bool) -> str:
    """README.md of the exported folder: front matter for the hub, what the model is, how to
    load it, the reward columns and weights, the judges, the evaluation before and after
    training, the cost, and the whole training config."""
    from mogrpo._version import __version__

    ev = run_evaluation(run)
    before, after = (_read_json(ev[t]) if ev[t] else None for t in ("before", "after"))
    cost = _read_json(run / "cost.json") or {}
    policy = str(cfg.get("policy"))
    base = BUILTIN_HUB_IDS.get(policy) or (policy if _hub_id(policy) else None)
    kind = _kind(run) or ""
    algo = kind.removeprefix("train ") if kind.startswith("train ") else ""
    md = ["---", "library_name: transformers", "pipeline_tag: text-generation",
          *([f"base_model: {base}"] if base else []),
          "tags:", *[f"- {t}" for t in ("mogrpo", algo, "safety", "alignment") if t], "---",
          "", f"# {name.rsplit('/', 1)[-1]}", ""]
    how = (f"LoRA (r={cfg.get('lora_r')}) merged into the weights" if merged
           else "full fine-tuning")
    step = cost.get("selected_step")
    md.append(f"`{policy}` trained with {algo.upper() or 'a policy algorithm'} by mogrpo "
              f"{__version__} ({how}), "
              f"exported from the run folder `{run.name}`"
              + (f"; the weights are those of step {step} of {cost.get('steps')}, selected on "
                 "the validation split" if step is not None else "") + ".")
    md += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
           f'tok = AutoTokenizer.from_pretrained("{name}")',
           f'model = AutoModelForCausalLM.from_pretrained("{name}")', "```", ""]
    md += _reward_section(cfg, after or before)
    judges = judges_of(after or before or {})
    if judges:
        md += ["## Judges", "", "| metric | judge |", "|---|---|",
               *[f"| {k} | {v.replace('|', chr(92) + '|')} |" for k, v in judges.items()], ""]
    table = eval_table(before, after)
    if table:
        ev = after or before
        decoding = ev.get("decoding") or "greedy"
        tokens = ev.get("max_new_tokens") or cfg.get("eval_max_new_tokens")
        md += ["## Evaluation", "",
               f"Held-out prompts (never trained on): {_prompt_counts(ev)}; {decoding} decoding"
               + (f", {tokens} new tokens" if tokens else "") + ". Compliance is the share of "
               "harmful prompts answered, over-refusal the share of benign prompts refused "
               "(lower is better for both).", "", *table, ""]
    if cost:
        md += ["## Training cost", "",
               f"{cost.get('wall_seconds', 'n/a')} s wall, peak memory "
               f"{cost.get('peak_memory_mb', 'n/a')} MB, {cost.get('tokens_generated', 'n/a')} "
               f"tokens generated, {cost.get('processes', 1)} process(es) on "
               f"{cost.get('device', 'n/a')}.", ""]
    import yaml

    md += ["## Training config", "", "mogrpo's config of the run (also in "
           "training/config.yaml):", "", "```yaml",
           yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(md)


def _hub_id(ref: str) -> bool:
    from mogrpo.runfolder import looks_local

    return "/" in ref and not ref.startswith("builtin:") and not looks_local(ref)


# The judges an evaluation's metrics come from, where its eval.json does not name them (the
# trainers' own evaluations): (metric, where it is found, the judge)
JUDGES = [("aspects", "aspects", "training reward model (the training signal, not an "
                                 "independent judge)"),
          ("eval_rm", "eval_rm", "evaluator reward model"),
          ("refusal_rate", "refusal_rate", "refusal patterns (mogrpo/eval/metrics.py)"),
          ("judged_compliance_rate", "judged_compliance_rate",
           "compliance judge, reads past a refusal opener (mogrpo/eval/compliance.py)"),
          ("toxicity", "toxicity", "toxicity judge (alt-profanity-check)")]


def judges_of(ev: dict) -> dict[str, str]:
    """{metric: judge} of an evaluation: those its eval.json names, and those whose metrics it
    holds."""
    parts = [ev.get("harmful") or {}, ev.get("benign") or {}]
    out = {k: text for k, key, text in JUDGES
           if any(p.get(key) not in (None, {}) for p in parts)}
    return {**out, **{k: v for k, v in (ev.get("judges") or {}).items() if v}}


def _prompt_counts(ev: dict) -> str:
    if ev.get("harmful") or ev.get("benign"):
        return (f"{(ev.get('harmful') or {}).get('n', 0)} harmful, "
                f"{(ev.get('benign') or {}).get('n', 0)} benign")
    return f"{ev.get('n', 0)} (no prompt kinds)"


def _reward_section(cfg: dict, ev: dict | None) -> list[str]:
    """The reward (model or sources), and each reward column with the weight and masks the
    run trained with (reward/objective.resolve_run_objective, as its trainer resolved them;
    columns: the evaluation's, else the sources' names, else the weights')."""
    from mogrpo.reward.objective import resolve_run_objective

    ev = ev or {}
    aspects = list(ev.get("aspects") or {})
    for kind in ("harmful", "benign"):
        aspects += list((ev.get(kind) or {}).get("aspects") or {})
    sources = cfg.get("rewards")
    named = [s.get("name") for s in sources or [] if s.get("name")]
    columns = list(dict.fromkeys(aspects or named or [*(cfg.get("weights") or {})]))
    columns += [c for c in cfg.get("extra_rewards") or [] if c not in columns]
    if not columns:
        return []
    weights, na = resolve_run_objective(columns, cfg)
    mode = cfg.get("advantage_mode")
    what = (f"Reward sources: {json.dumps(sources)}" if sources
            else f"Reward model: `{cfg.get('reward_model')}`")
    out = ["## Reward", "", f"{what} (the training signal)."
           + (f" Advantage mode: {mode}" if mode else "")
           + (f"; thresholds {json.dumps(cfg['thresholds'])}" if cfg.get("thresholds") else "")
           + (". " if mode else " ") + "A weight of 0 logs a column without training on it.",
           "", "| reward column | weight | not applicable on |", "|---|---|---|"]
    for c in columns:
        kinds = ", ".join(k for k, cols in na.items() if c in (cols or [])) or "-"
        out.append(f"| {c} | {_fmt(weights.get(c, 0.0))} | {kinds} |")
    return out + [""]
