"""The report's plots (plots/*.png): per-aspect scores, training curves, cost, safety against
actionability and the independent judges, with min–max error bars over seeds."""

from __future__ import annotations

import json
from pathlib import Path

from mogrpo.report.rows import _aspect_order, columns_for
from mogrpo.report.seeds import _number


def _range(per_seed: dict, model: str, key: str, mean) -> tuple[float, float]:
    """(mean - min, max - mean) over a model's seeds, for error bars; (0, 0) with one value."""
    vals = [r.get(key) for r in (per_seed.get(model) or {}).values() if _number(r.get(key))]
    if len(vals) < 2 or mean is None:
        return (0.0, 0.0)
    return (mean - min(vals), max(vals) - mean)


def make_plots(run: Path, rows: dict[str, dict], costs: dict, folders: dict[str, list[Path]],
               per_seed: dict[str, dict] | None = None) -> dict[str, str]:
    """The report's plots, in `run`/plots/ (the report's folder). `rows`: {model: row}
    (algorithms: seed-wise means); `folders`: {algo: its run folders, one per seed} (training
    curves); `per_seed`: {algo: {seed: row}}, whose min–max over
    seeds become error bars (and a band on the training curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_seed = per_seed or {}
    (run / "plots").mkdir(exist_ok=True)
    plots = {}
    models = list(rows)

    spread = any(len(by) > 1 for by in per_seed.values())  # error bars only then

    def err(model: str, keys: list[str], values: list) -> list[list[float]] | None:
        if not spread:
            return None
        lo_hi = [_range(per_seed, model, k, v) for k, v in zip(keys, values, strict=True)]
        return [[a for a, _ in lo_hi], [b for _, b in lo_hi]]

    # one key, several models
    def across(ms: list[str], key: str, values: list) -> list[list[float]] | None:
        if not spread:
            return None
        lo_hi = [_range(per_seed, m, key, v) for m, v in zip(ms, values, strict=True)]
        return [[a for a, _ in lo_hi], [b for _, b in lo_hi]]

    # 1. per-aspect scores per model (training RM and evaluator RM)
    aspect_keys = [k for k, _, _ in columns_for(rows)
                   if k.startswith(("rm/", "eval_rm/")) and k != "rm/combined"]
    if aspect_keys:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(aspect_keys)), 4))
        width = 0.8 / len(models)
        for i, m in enumerate(models):
            vals = [rows[m].get(k) for k in aspect_keys]
            ax.bar([j + i * width for j in range(len(aspect_keys))], [v or 0 for v in vals], width,
                   label=m, yerr=err(m, aspect_keys, vals), capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(aspect_keys))])
        ax.set_xticklabels([k.replace("rm/", "RM ").replace("eval_RM ", "eval RM ")
                            for k in aspect_keys], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("mean score")
        ax.set_title("Per-aspect scores on held-out prompts")
        ax.legend(fontsize=8)
        plots["aspects"] = _save(fig, run / "plots" / "aspects.png")

    # 2. training curves per aspect per algorithm (GRPO and PPO log rewards per step); with
    # several seeds the mean over seeds, in a min–max band
    curves = {}
    for a, names in folders.items():
        recs = []
        for folder in names:
            f = Path(folder) / "metrics.jsonl"
            if f.is_file():
                recs.append([json.loads(x) for x in f.read_text().splitlines() if x.strip()])
        if recs:
            curves[a] = recs
    aspect_names = sorted({k.split("/")[1] for seeds in curves.values() for recs in seeds
                           for r in recs for k in r
                           if k.startswith(("reward/", "rewards/")) and k.endswith("/mean")},
                          key=_aspect_order)
    if aspect_names:
        fig, axes = plt.subplots(1, len(aspect_names), figsize=(3.2 * len(aspect_names), 3),
                                 squeeze=False)
        for ax, asp in zip(axes[0], aspect_names, strict=True):
            for a, seeds in curves.items():
                by_step: dict = {}
                for recs in seeds:
                    for r in recs:  # per column rewards/NAME/mean; reward/combined/mean
                        v = r.get(f"rewards/{asp}/mean", r.get(f"reward/{asp}/mean"))
                        if v is not None:
                            by_step.setdefault(r["step"], []).append(v)
                if by_step:
                    xs = sorted(by_step)
                    line, = ax.plot(xs, _smooth([sum(by_step[x]) / len(by_step[x]) for x in xs]),
                                    label=a)
                    if len(seeds) > 1:
                        ax.fill_between(xs, _smooth([min(by_step[x]) for x in xs]),
                                        _smooth([max(by_step[x]) for x in xs]),
                                        color=line.get_color(), alpha=0.2)
            ax.set_title(asp, fontsize=9)
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("training RM, batch mean (smoothed)")
        axes[0][-1].legend(fontsize=8)
        fig.suptitle("Training curves (DPO trains offline on fixed pairs: no per-step rewards)",
                     fontsize=9)
        plots["training_curves"] = _save(fig, run / "plots" / "training_curves.png")

    # 3. cost per algorithm: wall time by phase, and peak memory
    if costs:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
        phases = sorted({p for c in costs.values() for p in c.get("phase_seconds", {})})
        bottom = [0.0] * len(costs)
        for p in phases:
            vals = [c.get("phase_seconds", {}).get(p, 0.0) for c in costs.values()]
            ax1.bar(list(costs), vals, bottom=bottom, label=p)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        if spread:
            walls = [c.get("wall_seconds") for c in costs.values()]
            ax1.errorbar(list(costs), [w or 0 for w in walls],
                         yerr=across(list(costs), "wall_seconds", walls),
                         fmt="none", ecolor="black", capsize=3)
        ax1.set_ylabel("seconds")
        ax1.set_title("Wall time by phase")
        ax1.legend(fontsize=7)
        mems = [c["peak_memory_mb"] for c in costs.values()]
        ax2.bar(list(costs), mems, color="gray", yerr=across(list(costs), "peak_memory_mb", mems),
                capsize=3)
        ax2.set_ylabel("MB")
        ax2.set_title("Peak memory")
        plots["cost"] = _save(fig, run / "plots" / "cost.png")

    # 4. safety against actionability for every model
    pts = {m: (r.get("rm/harmful_safety"), r.get("rm/benign_actionability"))
           for m, r in rows.items()}
    if any(s is not None and a is not None for s, a in pts.values()):
        fig, ax = plt.subplots(figsize=(5, 4))
        for m, (s, a) in pts.items():
            if s is not None and a is not None:
                ax.errorbar(a, s, xerr=err(m, ["rm/benign_actionability"], [a]),
                            yerr=err(m, ["rm/harmful_safety"], [s]), fmt="o", ms=7, capsize=2,
                            label=f"{m} (train RM)")
                ax.annotate(m, (a, s), fontsize=8, xytext=(4, 4), textcoords="offset points")
            es = rows[m].get("eval_rm/harmful_safety")
            ea = rows[m].get("eval_rm/benign_actionability")
            if es is not None and ea is not None:
                ax.scatter(ea, es, s=50, facecolors="none", edgecolors="black")
        ax.set_xlabel("benign actionability")
        ax.set_ylabel("harmful safety")
        ax.set_title("Safety vs actionability (filled: train RM, hollow: eval RM)", fontsize=9)
        plots["tradeoff"] = _save(fig, run / "plots" / "safety_vs_actionability.png")

    # 5. the independent judges: harmful compliance against benign over-refusal (lower-left is
    # better)
    pts = {m: (r.get("over_refusal_rate"), r.get("compliance_rate")) for m, r in rows.items()}
    pts = {m: p for m, p in pts.items() if p[0] is not None and p[1] is not None}
    if pts:
        fig, ax = plt.subplots(figsize=(5, 4))
        for m, (o, c) in pts.items():
            ax.errorbar(o, c, xerr=err(m, ["over_refusal_rate"], [o]),
                        yerr=err(m, ["compliance_rate"], [c]),
                        fmt="s" if m == "base" else "o", ms=7, capsize=3, label=m)
            ax.annotate(m, (o, c), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("benign over-refusal (refusal judge)")
        ax.set_ylabel("harmful compliance (refusal judge)")
        ax.set_title("What the models do (lower-left is better; bars: min–max over seeds)",
                     fontsize=9)
        plots["judges"] = _save(fig, run / "plots" / "judges.png")
    return {k: str(Path(v).relative_to(run)) for k, v in plots.items()}


def _smooth(ys: list[float], k: int = 5) -> list[float]:
    return [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1])
            for i in range(len(ys))]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)
