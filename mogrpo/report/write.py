"""write_report: a run folder's report.md, report.json and plots, from the rows (rows.py), their
means and spreads over seeds (seeds.py), the markdown sections (sections.py) and the plots
(plots.py)."""

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
    multi = len(seeds) > 1
    base_file = run / "eval" / "base" / "eval.json"
    if not base_file.is_file():
        raise FileNotFoundError(f"{run}/eval/base/eval.json missing: run the pipeline first")
    base_ev = json.loads(base_file.read_text())
    # per algorithm: {seed: stage folder name}, for the seeds whose evaluation is finished
    folders = {a: {s: algo_stage(a, s, seeds) for s in seeds
                   if (run / "eval" / algo_stage(a, s, seeds) / "eval.json").is_file()}
               for a in algorithms}
    folders = {a: f for a, f in folders.items() if f}
    per_seed: dict[str, dict] = {}  # algo -> {seed: row}
    seed_costs: dict[str, dict] = {}  # algo -> {seed: cost.json}
    for a, by_seed in folders.items():
        per_seed[a] = {}
        for s, name in by_seed.items():
            row = model_row(json.loads((run / "eval" / name / "eval.json").read_text()))
            f = run / name / "cost.json"
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
    plots = make_plots(run, rows, costs, {a: list(f.values()) for a, f in folders.items()},
                       per_seed)
    means = " (seed-wise means)" if multi else ""

    md = ["# mogrpo run report", ""]
    md.append(f"Held-out prompts: {base_ev.get('harmful', {}).get('n', 0)} harmful, "
              f"{base_ev.get('benign', {}).get('n', 0)} benign; {base_ev.get('decoding')} "
              f"decoding, {base_ev.get('max_new_tokens')} new tokens. 'train RM' is the training "
              "reward model (the signal the policies optimised, not an independent judge); "
              "'eval RM' is the evaluator reward model (trained on disjoint prompts with another "
              "seed); refusal, compliance and toxicity come from independent judges "
              "(docs/evaluation.md). Best value per column in bold.")
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
              "prompts refused.")
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
    md += _reward_model_section(run)
    agree = judge_agreement()
    md += _judges_section(agree)
    md += _tuning_section(run, folders)
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
        md.append(f"- Training-RM aspects: {'all improved' if all_rm else 'NOT all improved'} "
                  f"({_changes(v, rm_keys)}).")
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
    md += _examples(run,
                    {"base": "base", **{a: next(iter(f.values())) for a, f in folders.items()}},
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
    atomic_write_text(run / "report.md", "\n".join(md) + "\n")
    atomic_write_text(run / "report.json", json.dumps(report, indent=2))
    return report
