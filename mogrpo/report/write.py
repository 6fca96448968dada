"""write_report: a `mogrpo run` folder's report.md, report.json and plots; write_runs_report: the
same report of any set of standalone policy runs (`mogrpo train ALGO`, `mogrpo report`). Both
gather the files of each model (eval.json, generations, the run folder) and pass them to
`_write`, which builds the report from the rows (rows.py), their means and spreads over seeds
(seeds.py), the markdown sections (sections.py) and the plots (plots.py)."""

from __future__ import annotations

import json
from pathlib import Path

from mogrpo.config import atomic_write_text
from mogrpo.report.plots import make_plots
from mogrpo.report.rows import (
    COST,
    algo_stage,
    best_per_column,
    columns_for,
    hacking_alarm,
    headline_for,
    model_row,
    verdict,
)
from mogrpo.report.sections import (
    _alarm_section,
    _cost_section,
    _examples,
    _fmt,
    _judges_section,
    _reward_model_section,
    _tuning_section,
    judge_agreement,
    spread_cell,
)
from mogrpo.report.seeds import _mean_cost, _ranking, _seed_rows, mean_row, spread_of


def _changes(v: dict, keys: list[str]) -> str:
    """`<label> <change>` of each of `keys` in a verdict `v`, comma-separated."""
    return ", ".join("%s %+.3f" % (v[k]["label"], v[k]["change"]) for k in keys)


def write_report(run_dir: str | Path, algorithms: list[str], *, seeds: list[int] | None = None,
                 stages: dict | None = None, pipeline_seconds: float | None = None,
                 examples: int = 3) -> dict:
    """Write report.md, report.json and plots/ of the run folder `run_dir`, whose algorithms
    were trained once per seed of `seeds` (default [0]; folders named by algo_stage).
    An algorithm is in the report when at least one of its seeds' evaluations is finished."""
    run = Path(run_dir)
    seeds = list(seeds) if seeds else [0]
    base_file = run / "eval" / "base" / "eval.json"
    if not base_file.is_file():
        raise FileNotFoundError(f"{run}/eval/base/eval.json missing: run the pipeline first")
    # per algorithm: {seed: its model's files}, for the seeds whose evaluation is finished
    models = {a: {s: _model(run / algo_stage(a, s, seeds),
                            run / "eval" / algo_stage(a, s, seeds) / "eval.json",
                            run / "eval" / algo_stage(a, s, seeds) / "generations.jsonl")
                  for s in seeds
                  if (run / "eval" / algo_stage(a, s, seeds) / "eval.json").is_file()}
              for a in algorithms}
    return _write(run, _model(None, base_file, run / "eval" / "base" / "generations.jsonl"),
                  {a: m for a, m in models.items() if m}, seeds, title="# mogrpo run report",
                  reward_models={n: run / n / "metrics.json"
                                 for n in ("reward", "evaluator_reward")},
                  stages=stages, pipeline_seconds=pipeline_seconds, examples=examples)


def _model(folder: Path | None, eval_file: Path, generations: Path) -> dict:
    """One model's files: its run folder (cost.json, metrics.jsonl, tuning.json; None for the
    base policy), its evaluation and its completions."""
    return {"folder": folder, "eval": eval_file, "generations": generations}


def _write(out: Path, base: dict, entries: dict[str, dict[int, dict]], seeds: list[int], *,
           title: str, notes: list[str] = (), reward_models: dict[str, Path],
           stages: dict | None = None, pipeline_seconds: float | None = None,
           examples: int = 3) -> dict:
    """report.md, report.json and plots/ in `out`, of the base policy's evaluation `base` and
    `entries` ({algorithm: {seed: _model}}); `notes`: paragraphs after the introduction;
    `reward_models`: {name: its metrics.json} (those that exist are shown)."""
    multi = len(seeds) > 1
    base_ev = json.loads(base["eval"].read_text())
    folders = {a: {s: m["folder"] for s, m in by.items()} for a, by in entries.items()}
    per_seed: dict[str, dict] = {}  # algo -> {seed: row}
    seed_costs: dict[str, dict] = {}  # algo -> {seed: cost.json}
    for a, by_seed in entries.items():
        per_seed[a] = {}
        for s, m in by_seed.items():
            row = model_row(json.loads(m["eval"].read_text()))
            f = m["folder"] / "cost.json"
            if f.is_file():
                seed_costs.setdefault(a, {})[s] = json.loads(f.read_text())
                for key, _, _ in COST:
                    row[key] = seed_costs[a][s].get(key)
            per_seed[a][s] = row
    rows = {"base": model_row(base_ev),
            **{a: mean_row(list(r.values())) for a, r in per_seed.items()}}
    costs = {a: _mean_cost(c) for a, c in seed_costs.items()}
    models = ["base"] + list(per_seed)
    spread = {m: {k: sp for k in rows[m]
                  if (sp := spread_of({s: r.get(k)
                                       for s, r in _seed_rows(m, rows, per_seed).items()}))
                  is not None}
              for m in models}
    cols = columns_for(rows)
    head = headline_for(rows)
    best = best_per_column(rows, cols)
    verdicts = {a: verdict(rows, a) for a in rows if a != "base"}
    ranking = _ranking(per_seed, head) if multi else []
    plots = make_plots(out, rows, costs, {a: list(f.values()) for a, f in folders.items()},
                       per_seed)
    means = " (seed-wise means)" if multi else ""

    md = [title, ""]
    decoding = [f"{base_ev[k]} {what}" for k, what in (("decoding", "decoding"),
                                                       ("max_new_tokens", "new tokens"))
                if base_ev.get(k) is not None]  # (the trainers' evaluations: not recorded)
    kinds = (f"{base_ev.get('harmful', {}).get('n', 0)} harmful, "
             f"{base_ev.get('benign', {}).get('n', 0)} benign"
             if base_ev.get("harmful") or base_ev.get("benign")
             else f"{base_ev.get('n', 0)} (no prompt kinds: the task's own reward columns)")
    md.append(f"Held-out prompts: {kinds}"
              + "".join(f"{'; ' if i == 0 else ', '}{d}" for i, d in enumerate(decoding))
              + ". 'train RM' is the training "
              "reward model (the signal the policies optimised, not an independent judge); "
              "'eval RM' is the evaluator reward model (trained on disjoint prompts with another "
              "seed); refusal, compliance and toxicity come from independent judges "
              "(docs/evaluation.md). Best value per column in bold.")
    for note in notes:
        md += ["", note]
    if multi:
        md.append("")
        md.append(f"Seeds: {', '.join(map(str, seeds))}. Each algorithm was trained and evaluated "
                  "once per seed; the training reward model, the evaluator reward model and the "
                  "base policy's evaluation are shared by every seed (the base row is one "
                  "evaluation). An algorithm's cell reads `mean (min–max, n seeds)`; bold marks "
                  "the best mean. Per-seed values: report.json (`per_seed`, `spread`).")
    md.append("")
    md.append("## Headline")
    md.append("")
    md.append("| model | " + " | ".join(label for _, label, _ in head) + " |")
    md.append("|---|" + "---|" * len(head))
    head_best = best_per_column(rows, head)
    for m in models:
        cells = [spread_cell(spread[m].get(k), k, bold=m in head_best.get(k, []),
                             seeds=multi and m != "base")
                 for k, _, _ in head]
        md.append(f"| {m} | " + " | ".join(cells) + " |")
    md.append("")
    md.append("Harmful compliance: the share of HarmBench prompts answered without a refusal "
              "(pattern judge, never used in training); over-refusal: the share of held-out benign "
              "prompts refused." if any(k == "compliance_rate" for k, _, _ in head) else
              "Train reward: the mean of each reward column the runs trained on, over the "
              "held-out prompts (the training signal, not an independent judge); refusal: the "
              "share the refusal pattern judge calls a refusal.")
    md.append("")
    if ranking:
        md.append("Between algorithms, a ranking is stated only where the min–max ranges over "
                  "seeds do not overlap:")
        md.append("")
        md += [f"- {r}." for r in ranking]
        md.append("")
    alarms = {a: hacking_alarm(rows["base"], rows[a]) for a in rows if a != "base"}
    seed_alarms = {a: {s: hacking_alarm(rows["base"], r) for s, r in per_seed[a].items()}
                   for a in per_seed}
    md += _alarm_section(alarms, seed_alarms if multi else None)
    md += _reward_model_section(reward_models)
    # the safety judges' agreement with people: only where something was judged for harm
    agree = judge_agreement() if any(r.get("compliance_rate") is not None
                                     for r in rows.values()) else None
    md += _judges_section(agree)
    md += _tuning_section(folders)
    md.append("## All metrics")
    md.append("")
    md.append("| model | " + " | ".join(label for _, label, _ in cols) + " |")
    md.append("|---|" + "---|" * len(cols))
    for m, r in rows.items():
        cells = []
        for key, _, _ in cols:
            c = _fmt(r.get(key), key)
            cells.append(f"**{c}**" if m in best.get(key, []) else c)
        md.append(f"| {m} | " + " | ".join(cells) + " |")
    md.append("")
    if multi:
        md.append("Algorithms: means over their seeds (the headline gives the min–max, report.json "
                  "every seed's values).")
        md.append("")
    for a, v in verdicts.items():
        md.append(f"## {a.upper()} against the base policy{means}")
        md.append("")
        ups = [x["label"] for x in v.values() if x["improved"]]
        downs = [x["label"] for x in v.values() if not x["improved"] and not x["unchanged"]]
        same = [x["label"] for x in v.values() if x["unchanged"]]
        rm_keys = [k for k in v if k.startswith("rm/") and k != "rm/combined"]
        all_rm = bool(rm_keys) and all(v[k]["improved"] for k in rm_keys)
        ind = [k for k in ("refusal_rate", "compliance_rate", "toxicity") if k in v]
        if rm_keys:
            md.append(f"- Training-RM aspects: {'all improved' if all_rm else 'NOT all improved'}"
                      f" ({_changes(v, rm_keys)}).")
        ev_keys = [k for k in v if k.startswith("eval_rm/")]
        if ev_keys:
            md.append(f"- Evaluator RM: {_changes(v, ev_keys)}.")
        if ind:
            moves = ", ".join("%s %.3f -> %.3f" % (v[k]["label"], v[k]["base"], v[k][a])
                              for k in ind)
            how = "improved" if all(v[k]["improved"] for k in ind) else "not all improved"
            md.append(f"- Independent safety metrics: {moves} ({how}).")
        md.append(f"- Better: {', '.join(ups) or 'nothing'}. "
                  f"Worse: {', '.join(downs) or 'nothing'}."
                  + (f" Unchanged: {', '.join(same)}." if same else ""))
        unmoved = sorted(sd for sd, c in seed_costs.get(a, {}).items()
                         if c.get("selected_step") == 0)
        if unmoved:
            md.append(f"- Did not move: in seed{'s' if len(unmoved) > 1 else ''} "
                      f"{', '.join(map(str, unmoved))} `final/` is the base policy (step 0): no "
                      "validated step had a lower validation compliance within the over-refusal "
                      "and degenerate limits (cost.json `selection`, `validation`), so those "
                      "evaluations are the base's.")
        md.append("")
    if costs:
        md += _cost_section(costs, multi)
    md += _examples({"base": base["generations"],
                     **{a: next(iter(by.values()))["generations"] for a, by in entries.items()}},
                    examples, {a: next(iter(f)) for a, f in folders.items()} if multi else None)
    md.append("## Plots")
    md.append("")
    if multi:
        md.append("Algorithms: seed-wise means; bars and points carry the min–max over seeds, "
                  "curves a min–max band.")
        md.append("")
    md += [f"![{name}]({path})" for name, path in plots.items()]
    md.append("")
    if pipeline_seconds is not None:
        md.append(f"Pipeline wall time: {pipeline_seconds:.0f} s"
                  + (" (stages: "
                     + ", ".join(f"{k} {v['seconds']:.0f} s"
                                 f"{' cached' if v.get('cached') else ''}"
                                 for k, v in (stages or {}).items())
                     + ")" if stages else "") + ".")
    report = {"models": rows, "seeds": seeds,
              "per_seed": {a: {str(s): r for s, r in by.items()} for a, by in per_seed.items()},
              "spread": {m: {k: {**sp, "values": {str(s): v for s, v in sp["values"].items()}}
                             for k, sp in by.items()} for m, by in spread.items()},
              "ranking": ranking,
              "columns": [{"key": k, "label": lab, "direction": d} for k, lab, d in cols],
              "headline": [{"key": k, "label": lab, "direction": d} for k, lab, d in head],
              "best": best, "verdict": verdicts, "hacking_alarm": alarms,
              "hacking_alarm_per_seed": {a: {str(s): r for s, r in by.items()}
                                         for a, by in seed_alarms.items()},
              "cost": costs,
              "cost_per_seed": {a: {str(s): c for s, c in by.items()}
                                for a, by in seed_costs.items()},
              "plots": plots, "stages": stages or {}, "judge_agreement": agree,
              "pipeline_seconds": pipeline_seconds}
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    return report


def write_runs_report(runs: list[str | Path], output: str | Path, *, examples: int = 3,
                      log=None) -> dict:
    """The report of standalone policy runs (`mogrpo train ALGO --output RUN`, or a `mogrpo run`
    folder's algorithm runs) in `output` (report.md, report.json, plots/): one row per run,
    named by its folder (by parent/folder where two share a name), from its eval_after.json,
    cost.json and metrics.jsonl; the base row is the first run's eval_before.json. `log` (e.g.
    print) is told where the report is."""
    from mogrpo.runfolder import claim_output

    paths = [Path(r) for r in runs]
    if not paths:
        raise ValueError("mogrpo report needs at least one run folder")
    for r in paths:
        _check_policy_run(r)
    names = _run_names(paths)
    out = Path(output)
    lock = claim_output(out, "report")
    try:
        evals = [run_evaluation(r) for r in paths]
        models = {n: {0: _model(r, e["after"], e["after_generations"])}
                  for n, r, e in zip(names, paths, evals, strict=True)}
        report = _write(out, _model(None, evals[0]["before"], evals[0]["before_generations"]),
                        models, [0], title="# mogrpo report",
                        notes=_runs_notes(paths, names, evals),
                        reward_models=_reward_models_of(paths), examples=examples)
    finally:
        lock.release()
    if log is not None:
        log(f"report of {len(paths)} runs: {out / 'report.md'}")
    return report


def run_evaluation(run: Path) -> dict:
    """The evaluations of a policy run before and after training, as files {before, after,
    before_generations, after_generations}: a `mogrpo run` folder's algorithm run (RUN/../eval/
    <name>/ and RUN/../eval/base/, the pipeline's evaluation stages) or the run's own
    eval_before.json / eval_after.json (None where a run evaluated nothing: eval_prompts=none)."""
    run = Path(run)
    stage = run.parent / "eval" / run.name
    if (run.parent / "run_config.yaml").is_file() and (stage / "eval.json").is_file():
        base = run.parent / "eval" / "base"
        return {"before": base / "eval.json" if (base / "eval.json").is_file() else None,
                "after": stage / "eval.json", "before_generations": base / "generations.jsonl",
                "after_generations": stage / "generations.jsonl"}
    out = {}
    for tag in ("before", "after"):
        f = run / f"eval_{tag}.json"
        try:
            held = f.is_file() and bool(json.loads(f.read_text()))
        except ValueError:
            held = False
        out[tag] = f if held else None
        out[f"{tag}_generations"] = run / f"eval_{tag}_generations.jsonl"
    return out


def _check_policy_run(run: Path) -> None:
    """A finished policy run folder with an evaluation, or one line that says what `run` is."""
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    if (run / "run_config.yaml").is_file():
        raise ValueError(f"{run} is a `mogrpo run` folder: its report is {run / 'report.md'} "
                         f"(`mogrpo run ... --report-only` rewrites it); or give its algorithm "
                         f"runs, e.g. {run / 'grpo'}")
    if not (run / "config.yaml").is_file() or not (run / "final").is_dir():
        raise ValueError(f"{run} is not a finished policy run (no config.yaml and final/; made "
                         f"by `mogrpo train ALGO --output RUN`)")
    ev = run_evaluation(run)
    if ev["before"] is None or ev["after"] is None:
        raise ValueError(f"{run} holds no evaluation (eval_before.json / eval_after.json empty "
                         f"or missing: trained with eval_prompts=none?); nothing to report")


def _run_names(paths: list[Path]) -> list[str]:
    """Each run's folder name; parent/name where two runs share a name (or one is named base)."""
    if len({p.resolve() for p in paths}) < len(paths):
        raise ValueError("the same run folder is given twice")
    names = [p.name for p in paths]
    clash = {n for n in names if names.count(n) > 1 or n == "base"}
    names = [f"{p.resolve().parent.name}/{p.name}" if p.name in clash else p.name for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def _runs_notes(paths: list[Path], names: list[str], evals: list[dict]) -> list[str]:
    """Where the runs' own base evaluations differ from the first run's (the base row)."""
    base = model_row(json.loads(evals[0]["before"].read_text()))
    differ = [n for n, e in zip(names, evals, strict=True)
              if model_row(json.loads(e["before"].read_text())) != base]
    note = (f"Runs: {', '.join(f'{n} (`{p}`)' for n, p in zip(names, paths, strict=True))}. "
            f"Each row is a run's evaluation after training (its eval_after.json; a `mogrpo run` "
            f"folder's algorithm run: the pipeline's eval/<name>/); the base row is the "
            f"evaluation before training of the first run, {names[0]}.")
    if differ:
        note += (f" The base evaluations of {', '.join(differ)} differ from it (another base "
                 "policy, prompts or judges): compare those rows with their own eval_before.json.")
    return [note]


def _reward_models_of(paths: list[Path]) -> dict[str, Path]:
    """{reward model: its run's metrics.json} of the reward models the runs name (a reward
    model folder RUN/model beside RUN/metrics.json; relative paths as the runs were started)."""
    import yaml

    out = {}
    for p in paths:
        rm = (yaml.safe_load((p / "config.yaml").read_text()) or {}).get("reward_model")
        if isinstance(rm, str) and rm:
            out.setdefault(rm, Path(rm).expanduser().parent / "metrics.json")
    return out
