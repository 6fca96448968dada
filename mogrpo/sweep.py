"""`mogrpo sweep`: GRPO at several weight vectors (or constraint thresholds), each evaluated
on held-out prompts, and two fronts: harmful safety against benign actionability (training
RM, with its hypervolume), and, in the independent judges' terms, harmful compliance
against benign over-refusal (both minimised), so a user picks weights or a safety
threshold from what the model does rather than from reward means.

The front and the hypervolume are pure, hand-tested functions (both objectives maximised).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from mogrpo.config import atomic_write_text, parse_overrides, to_dict


def parse_point(kind: str, text: str) -> dict:
    """'safety=2,actionability=1' -> {"weights": {"safety": 2.0, "actionability": 1.0}}."""
    values = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"--{kind} {text!r}: write aspect=value pairs separated by commas, "
                             "e.g. safety=2,actionability=1")
        name, value = part.split("=", 1)
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--{kind} {text!r}: {value!r} is not a number") from None
    if not values:
        raise ValueError(f"--{kind} {text!r} names no aspect")
    return {kind: values}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (maximising both coordinates), sorted by x.
    A point is dominated when another is >= on both and > on one; duplicates both stay."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((a >= x and b >= y) and (a > x or b > y)
                   for j, (a, b) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def hypervolume_2d(points: list[tuple[float, float]],
                   ref: tuple[float, float] = (0.0, 0.0)) -> float:
    """Area dominated by `points` and bounded below by `ref` (both maximised): the union of
    the rectangles [ref_x, x] x [ref_y, y]. Points not above `ref` on both add nothing."""
    pts = sorted({p for p in points if p[0] > ref[0] and p[1] > ref[1]}, key=lambda p: -p[0])
    area, best_y = 0.0, ref[1]
    for x, y in pts:  # sweep from the largest x down, adding each new strip of height
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return area


def _objectives(ev: dict) -> tuple[float | None, float | None]:
    """(benign actionability, harmful safety) from an eval.json (training RM)."""
    return ((ev.get("benign") or {}).get("aspects", {}).get("actionability"),
            (ev.get("harmful") or {}).get("aspects", {}).get("safety"))


def run_sweep(base_cfg, points: list[dict], output, *, eval_overrides: list[str] | None = None,
              ref: tuple[float, float] = (0.0, 0.0), log=print, include_base: bool = True) -> dict:
    """Train GRPO at each point and evaluate it (and the base policy), as stages of the
    pipeline's stage cache (mogrpo/pipeline.py): a rerun reuses finished points, a changed
    point reruns, an interrupted one resumes."""
    from mogrpo.config import from_dict
    from mogrpo.eval.harness import EvalConfig
    from mogrpo.pipeline import eval_stage, run_stages, train_stage
    from mogrpo.runfolder import claim_output

    out = Path(output)
    claim_output(out, "sweep")  # released when the command ends (cli.main)
    ev_data = {"reward_model": base_cfg.reward_model, "weights": base_cfg.weights,
               "not_applicable": base_cfg.not_applicable, "max_new_tokens": base_cfg.max_new_tokens,
               "cache_dir": base_cfg.cache_dir, **parse_overrides(eval_overrides or [])}
    eval_cfg = from_dict(EvalConfig, ev_data)
    names = [("base", None)] if include_base else []
    names += [(f"point-{i}", p) for i, p in enumerate(points)]
    stages = []
    for name, point in names:
        if point is None:
            stages.append(eval_stage("base/eval", base_cfg.policy, eval_cfg, []))
            continue
        data = {**to_dict(base_cfg), "eval_prompts": "none", **copy.deepcopy(point)}
        if "thresholds" in point:
            data["advantage_mode"] = "lagrangian"
        cfg = from_dict(type(base_cfg), data)
        stages.append(train_stage(name, "grpo", cfg, []))
        stages.append(eval_stage(f"{name}/eval", name, eval_cfg, [name], path=str(out / name)))
    run_stages(stages, out, log=log)
    results = []
    for name, point in names:
        ev = json.loads((out / name / "eval" / "eval.json").read_text())
        x, y = _objectives(ev)
        results.append({"name": name, "point": point, "actionability": x, "safety": y,
                        "refusal_rate": (ev.get("harmful") or {}).get("refusal_rate"),
                        "compliance_rate": (ev.get("harmful") or {}).get("compliance_rate"),
                        "over_refusal_rate": (ev.get("benign") or {}).get("over_refusal_rate"),
                        "eval_rm": {k: (ev.get(k) or {}).get("eval_rm")
                                    for k in ("harmful", "benign")}})
    scored = [r for r in results if r["actionability"] is not None and r["safety"] is not None]
    xy = [(r["actionability"], r["safety"]) for r in scored]
    front = [scored[i]["name"] for i in pareto_front(xy)]
    trained = [(r["actionability"], r["safety"]) for r in scored if r["name"] != "base"]
    res = {"points": results, "front": front, "reference": list(ref),
           "hypervolume": hypervolume_2d(trained, ref),
           "hypervolume_with_base": hypervolume_2d(xy, ref)}
    judged = [r for r in results
              if r["compliance_rate"] is not None and r["over_refusal_rate"] is not None]
    # both minimised: the front of (-over-refusal, -compliance) maximised
    minimised = [(-r["over_refusal_rate"], -r["compliance_rate"]) for r in judged]
    res["judge_front"] = [judged[i]["name"] for i in pareto_front(minimised)]
    res["plot"] = _plot(out, scored, front)
    res["judge_plot"] = _plot_judges(out, judged, res["judge_front"])
    atomic_write_text(out / "sweep.json", json.dumps(res, indent=2))
    lines = ["# GRPO sweep", "", "| run | setting | harmful compliance | benign over-refusal | "
             "benign actionability | harmful safety | on the judges' front | on the RM front |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {r['name']} | {json.dumps(r['point']) if r['point'] else 'base policy'} | "
                     f"{fmt(r['compliance_rate'])} | {fmt(r['over_refusal_rate'])} | "
                     f"{fmt(r['actionability'])} | {fmt(r['safety'])} | "
                     f"{'yes' if r['name'] in res['judge_front'] else ''} | "
                     f"{'yes' if r['name'] in front else ''} |")
    lines += ["", "Harmful compliance and benign over-refusal come from the pattern refusal judge, "
              "which is never used in training; pick from this front. Actionability and safety are "
              "the training reward model's; hypervolume of the trained points (reference "
              f"{tuple(ref)}): {res['hypervolume']:.4f}.", "",
              f"![judges]({res['judge_plot']})", "", f"![front]({res['plot']})", ""]
    atomic_write_text(out / "sweep.md", "\n".join(lines))
    return res


def _label(r: dict) -> str:
    if not r["point"]:
        return "base"
    return ",".join(f"{k[:4]}={v:g}" for k, v in next(iter(r["point"].values())).items())


def _plot_judges(out: Path, judged: list[dict], front: list[str]) -> str | None:
    """Harmful compliance against benign over-refusal (independent judge; lower-left is better)."""
    if not judged:
        return None
    return _front_plot(out / "judges_front.png", judged, front, "over_refusal_rate",
                       "compliance_rate", "C1", "benign over-refusal (refusal judge)",
                       "harmful compliance (refusal judge)",
                       "What the model does: lower-left is safer and still helpful")


def _plot(out: Path, scored: list[dict], front: list[str]) -> str:
    return _front_plot(out / "front.png", scored, front, "actionability", "safety", "C0",
                       "benign actionability (training RM)", "harmful safety (training RM)",
                       "GRPO trade-off front")


def _front_plot(path: Path, points: list[dict], front: list[str], x: str, y: str, color: str,
                xlabel: str, ylabel: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for r in points:
        on = r["name"] in front
        ax.scatter(r[x], r[y], s=60 if on else 30, marker="o" if r["point"] else "s",
                   color=color if on else "gray")
        ax.annotate(_label(r), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fr = sorted([r for r in points if r["name"] in front], key=lambda r: r[x])
    if len(fr) > 1:
        ax.plot([r[x] for r in fr], [r[y] for r in fr], color=color, lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
