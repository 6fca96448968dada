"""The text the `mogrpo` commands print about a result: pure functions from the dicts the
library functions return (train_reward_model, train, evaluate, run_pipeline) to lines."""

from __future__ import annotations

from pathlib import Path


def _num(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def reward_metrics(metrics: dict, output) -> str:
    """`mogrpo reward train`: held-out test metrics per aspect and the sanity probes."""
    lines = [f"held-out test metrics ({output}/metrics.json):",
             f"  {'aspect':<16}{'pearson':>9}{'spearman':>10}{'mae':>8}{'n':>6}"]
    for a, m in metrics["aspects"].items():
        lines.append(f"  {a:<16}{_num(m['pearson']):>9}{_num(m['spearman']):>10}"
                     f"{_num(m['mae']):>8}{m['n']:>6}")
    san = metrics["sanity"]
    lines.append(f"  obvious cases ranked right: {san['passed']}/{san['total']}")
    lines += [f"    WRONG {p['aspect']}: {p['prompt']!r} better {p['better']:.3f} <= worse "
              f"{p['worse']:.3f}" for p in san["probes"] if not p["ok"]]
    lines.append(f"  trained in {metrics['train_seconds']} s; model saved to "
                 f"{Path(output) / 'model'}")
    return "\n".join(lines)


def train_result(result: dict, output) -> str:
    """`mogrpo train`: the held-out evaluation before and after (when there is one), the
    selected step and the wall time."""
    lines = []
    before, after = result.get("eval_before") or {}, result.get("eval_after") or {}
    if before:
        def cell(v) -> str:
            return f"{v:>9.4f}" if isinstance(v, (int, float)) else f"{'n/a':>9}"

        lines += ["held-out evaluation (greedy; refusal judge and training reward model):",
                  f"  {'kind':<9}{'column':<18}{'before':>9}{'after':>9}"]
        kinds = [k for k in ("harmful", "benign") if k in before] or ["all"]  # a task's own
        for kind in kinds:
            b, a = ((before, after) if kind == "all" else
                    (before.get(kind) or {}, after.get(kind) or {}))
            rows = [(k, b.get(k), a.get(k)) for k in ("compliance_rate", "over_refusal_rate")
                    if k in b]
            rows += [(c, v, (a.get("aspects") or {}).get(c))
                     for c, v in (b.get("aspects") or {}).items() if v is not None]
            for col, v, w in rows + [("combined", b.get("combined"), a.get("combined"))]:
                lines.append(f"  {kind:<9}{col:<18}{cell(v)}{cell(w)}")
    if "selected_step" in result:
        lines.append(f"  final/ is step {result['selected_step']}, selected on the validation "
                     f"prompts ({result['cost']['selection']['reason']})")
    lines.append(f"  wall {result['cost']['wall_seconds']} s; outputs in {output}")
    return "\n".join(lines)


def eval_result(res: dict, output) -> str:
    """`mogrpo eval`: rates, judges and reward models per prompt kind, then the rest."""
    lines = []
    kinds = [k for k in ("harmful", "benign") if res.get(k)] or ["all"]  # a task's own prompts
    for kind in kinds:
        part = res if kind == "all" else res[kind]
        rates = (f"refusal {_num(part['refusal_rate'])}, compliance "
                 f"{_num(part['compliance_rate'])}" if kind == "harmful"
                 else f"over-refusal {_num(part['over_refusal_rate'])}" if kind == "benign"
                 else f"refusal {_num(part.get('refusal_rate'))}")
        lines.append(f"{kind} ({part['n']} prompts): {rates}, toxicity "
                     f"{_num(part.get('toxicity'))}")
        for name, key in (("training RM", "aspects"), ("evaluator RM", "eval_rm")):
            if part.get(key):
                lines.append(f"  {name:<13}" + "  ".join(f"{a} {_num(v)}"
                                                         for a, v in part[key].items()))
    lines.append(f"KL to base {_num(res['kl_to_base'])}, length {_num(res['mean_length'])} "
                 f"tokens, distinct-2 {_num(res['distinct_2'])}, empty {_num(res['empty_rate'])}"
                 f", truncated {_num(res['truncated_rate'])}")
    lines.append(f"  {res['seconds']} s; eval.json and generations.jsonl in {output}")
    return "\n".join(lines)


REPORT_COLUMNS = [("rm/harmful_safety", "safety(h)"), ("rm/benign_actionability", "action(b)"),
                  ("eval_rm/harmful_safety", "evalRM safety(h)"), ("refusal_rate", "refusal(h)"),
                  ("over_refusal_rate", "over-refusal(b)"), ("toxicity", "toxicity"),
                  ("kl_to_base", "KL"), ("wall_seconds", "wall s"), ("peak_memory_mb", "peak MB")]


def run_report(report: dict) -> str:
    """`mogrpo run`: one row per model of the report."""
    lines = ["model " + "".join(f"{label:>17}" for _, label in REPORT_COLUMNS)]
    for m, row in report["models"].items():
        cells = [_num(row.get(k), ".3f" if row.get(k) is None or abs(row[k]) < 100 else ".0f")
                 for k, _ in REPORT_COLUMNS]
        lines.append(f"{m:<6}" + "".join(f"{c:>17}" for c in cells))
    if len(report.get("seeds") or []) > 1:
        lines.append(f"algorithms: means over seeds {report['seeds']}; min–max and rankings in "
                     "report.md")
    return "\n".join(lines)
