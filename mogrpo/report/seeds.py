"""The report across seeds: an algorithm's row and cost as the mean over its seeds, the spread
(mean, min, max) of each value, and the rankings between algorithms that are stated only where
the seeds' min–max ranges do not overlap (rank_by_ranges)."""

from __future__ import annotations

from mogrpo.report.rows import RANKED


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mean_row(rows: list[dict]) -> dict:
    """Per key, the mean of the numeric values of `rows` (None where none is numeric); a single
    row is returned as it is, so a one-seed report shows exactly its values."""
    if len(rows) == 1:
        return dict(rows[0])
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if _number(r.get(k))]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def spread_of(values: dict) -> dict | None:
    """{"mean", "min", "max", "n", "values"} of {seed: value}, numeric values only; None when
    none."""
    vals = {s: v for s, v in values.items() if _number(v)}
    if not vals:
        return None
    xs = list(vals.values())
    # one value stays as it is (an int stays an int)
    mean = xs[0] if len(xs) == 1 else sum(xs) / len(xs)
    return {"mean": mean, "min": min(xs), "max": max(xs), "n": len(xs), "values": vals}


def rank_by_ranges(values: dict[str, list[float]], direction: int, *, metric: str,
                   phrase: str = "is better than") -> list[str]:
    """One statement per pair of entries of `values` (in its order; entries without values are
    left out), from the min–max range of each entry's values (one per seed). Where the ranges
    do not overlap (the better one's worst value is strictly better than the other's best:
    touching ranges overlap): "<better> <phrase> <worse> on <metric> (<range> against <range>)".
    Otherwise: "<a> and <b>: the <metric> ranges overlap (<range> and <range>); no ranking is
    claimed". `direction` -1: lower is better; +1: higher is better. Ranges read `min–max`
    with three decimals."""
    if direction not in (-1, 1):
        raise ValueError("direction must be -1 (lower is better) or +1 (higher is better), "
                         f"got {direction!r}")
    rng = {name: (min(v), max(v)) for name, v in values.items() if v}

    def show(name: str) -> str:
        lo, hi = rng[name]
        return f"{lo:.3f}–{hi:.3f}"

    names, out = list(rng), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (alo, ahi), (blo, bhi) = rng[a], rng[b]
            if direction < 0:
                better = a if ahi < blo else b if bhi < alo else None
            else:
                better = a if alo > bhi else b if blo > ahi else None
            if better is None:
                out.append(f"{a} and {b}: the {metric} ranges overlap ({show(a)} and {show(b)}); "
                           "no ranking is claimed")
            else:
                worse = b if better == a else a
                out.append(f"{better} {phrase} {worse} on {metric} "
                           f"({show(better)} against {show(worse)})")
    return out


def _mean_cost(per_seed: dict) -> dict:
    """One cost.json from several seeds' (`per_seed`: {seed: cost}): numeric fields and phase
    seconds averaged (tokens rounded), `selected_step` per seed, other fields the first seed's."""
    cs = list(per_seed.values())
    if len(cs) == 1:
        return dict(cs[0])
    out = dict(cs[0])
    for k in dict.fromkeys(k for c in cs for k in c):
        vals = [c[k] for c in cs if _number(c.get(k))]
        if vals and k != "selected_step":
            out[k] = sum(vals) / len(vals)
    if "tokens_generated" in out and _number(out["tokens_generated"]):
        out["tokens_generated"] = round(out["tokens_generated"])
    phases = list(dict.fromkeys(p for c in cs for p in c.get("phase_seconds") or {}))
    out["phase_seconds"] = {p: sum((c.get("phase_seconds") or {}).get(p, 0.0) for c in cs) / len(cs)
                            for p in phases}
    if any("selected_step" in c for c in cs):
        out["selected_step"] = {s: c.get("selected_step") for s, c in per_seed.items()}
    out["seeds"] = len(cs)
    return out


def _seed_rows(model: str, rows: dict, per_seed: dict) -> dict:
    """{seed: row} of a model; the base policy's one evaluation is {"base": row}."""
    return {"base": rows["base"]} if model == "base" else per_seed[model]


def _ranking(per_seed: dict[str, dict], head) -> list[str]:
    """rank_by_ranges between the algorithms on harmful compliance, benign over-refusal and each
    further evaluation set's rate, over the per-seed values."""
    labels = {k: lab for k, lab, _ in head}
    what = RANKED + [(k, labels[k].replace(": ", " "),
                      "is safer than" if k.endswith("compliance_rate")
                      else "over-refuses less than")
                     for k in labels if k.startswith("set/")]
    out = []
    for key, metric, phrase in what:
        values = {a.upper(): [r[key] for r in by.values() if _number(r.get(key))]
                  for a, by in per_seed.items()}
        out += rank_by_ranges(values, -1, metric=metric, phrase=phrase)
    return out
