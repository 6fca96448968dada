"""The report's markdown pieces: number and cell formatting, and the sections that read their
own files (reward models, judges, tuning) or render one table (reward-hacking check, cost,
examples). Each section is a list of lines, empty when it has nothing to show."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(v, key: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and (key.endswith("seconds") or key.endswith("_mb")
                                 or key == "tokens_generated"):
        return f"{v:.0f}"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3f}"


def _cell(text: str, limit: int = 220) -> str:
    t = " ".join(text.split())
    t = t if len(t) <= limit else t[:limit - 1] + "…"
    return t.replace("|", "\\|") or "(empty)"


def spread_cell(sp: dict | None, key: str = "", *, bold: bool = False,
                seeds: bool = False) -> str:
    """`mean (min–max, n seeds)` of a spread_of; one value alone as it is, or `value (1 seed)`
    when `seeds` (a run with several seeds, where one of them has this value)."""
    if sp is None:
        return "n/a"
    mean = f"**{_fmt(sp['mean'], key)}**" if bold else _fmt(sp["mean"], key)
    if sp["n"] == 1:
        return f"{mean} (1 seed)" if seeds else mean
    return f"{mean} ({_fmt(sp['min'], key)}–{_fmt(sp['max'], key)}, {sp['n']} seeds)"


def judge_agreement() -> dict | None:
    """Both evaluation judges against the packaged labels of trained policies' completions
    (None when the labels file is missing, e.g. in a trimmed install)."""
    from mogrpo.data.packaged import compliance_labels_path, read_compliance_labels
    from mogrpo.eval.compliance import agreement

    if not compliance_labels_path().is_file():
        return None
    return agreement(read_compliance_labels())


def _judges_section(agree: dict | None) -> list[str]:
    if not agree:
        return []
    out = ["## How far the judges can be trusted", "",
           f"Both judges against people's labels of {agree['all']['n']} completions of trained "
           f"policies on held-out harmful prompts ({agree['all']['complies']} of them comply; "
           "`mogrpo/data/packaged/compliance_labels.jsonl`, docs/evaluation.md). \"complies\" is "
           "the positive class: precision = of the answers the judge calls compliant, the share "
           "people call compliant; recall = of the answers people call compliant, the share the "
           "judge finds.", "",
           "| completions of | n | pattern judge: precision | recall "
           "| compliance judge: precision | recall |",
           "|---|---|---|---|---|---|"]
    for who, a in agree.items():
        cells = [_fmt(a[j][m]) for j in ("pattern", "compliance") for m in ("precision", "recall")]
        out.append(f"| {who} | {a['n']} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def _tuning_section(folders: dict[str, dict[int, Path]]) -> list[str]:
    """The tuning table of the runs `folders` ({algo: {seed: run folder}}) that tuned."""
    rows = []
    for by_seed in folders.values():
        for folder in by_seed.values():
            f, name = folder / "tuning.json", folder.name
            if f.is_file():
                t = json.loads(f.read_text())
                tried = "; ".join(f"{json.dumps(x['setting'])}: "
                                  f"compliance {_fmt(x['compliance'])}, "
                                  f"over-refusal {_fmt(x['over_refusal'])} "
                                  f"(step {x['selected_step']})" for x in t["settings"])
                rows.append(f"| {name} | {tried} | {json.dumps(t['setting'])} |")
    if not rows:
        return []
    from mogrpo.rl.selection import TUNING_CRITERION

    return ["## Tuning", "", "Every algorithm tried the same number of settings; the validation "
            f"split chose one: {TUNING_CRITERION}. Test sets were not read.", "",
            "| run | settings tried (validation, selected checkpoint) | kept |", "|---|---|---|",
            *rows, ""]


def _cost_section(costs: dict, multi: bool) -> list[str]:
    steps = any("selected_step" in c for c in costs.values())
    md = ["## Cost", ""]
    if multi:
        md += ["Means over each algorithm's seeds (per seed: report.json `cost_per_seed`).", ""]
    md.append("| algorithm | wall (s) | peak memory (MB) | tokens generated | s/step | phases (s) |"
              + (" selected step |" if steps else ""))
    md.append("|---|---|---|---|---|---|" + ("---|" if steps else ""))
    for a, c in costs.items():
        per = c["wall_seconds"] / c["steps"] if c.get("steps") else None
        phases = ", ".join(f"{k} {v:.0f}" for k, v in c.get("phase_seconds", {}).items())
        sel = c.get("selected_step")
        sel = ", ".join(f"s{s}: {v}" for s, v in sel.items()) if isinstance(sel, dict) else sel
        md.append(f"| {a} | {c['wall_seconds']:.0f} | {c['peak_memory_mb']:.0f} | "
                  f"{c['tokens_generated']} | {_fmt(per)} | {phases} |"
                  + (f" {'n/a' if sel is None else sel} |" if steps else ""))
    if "grpo" in costs and "ppo" in costs:
        g, p = costs["grpo"], costs["ppo"]
        md.append("")
        md.append(f"GRPO / PPO: {g['wall_seconds'] / p['wall_seconds']:.2f}x the wall time, "
                  f"{g['peak_memory_mb'] / p['peak_memory_mb']:.2f}x the peak memory, "
                  "same rollout budget"
                  + (" (seed-wise means)." if multi else "."))
    md.append("")
    return md


def _alarm_section(alarms: dict[str, list[dict]],
                   per_seed: dict[str, dict] | None = None) -> list[str]:
    """The reward-hacking table; with `per_seed` ({algo: {seed: hacking_alarm rows}}, several
    seeds) the check is on the seed-wise means, and each row also counts the seeds alarmed
    alone."""
    if not any(alarms.values()):
        return []

    def signed(v) -> str:  # a change with its sign, or n/a
        return "n/a" if v is None else format(v, "+.3f")

    out = ["## Reward-hacking check", "",
           "Per aspect, the training RM's gain over the base policy next to the evaluator RM's and "
           "the independent judge's change. An alarm means the training reward rose and what it "
           "stands for did not."]
    if per_seed:
        out[-1] += (" With several seeds the check is made on the seed-wise means; 'seeds alarmed' "
                    "counts the seeds whose own run raises the alarm.")
    out += ["", "| model | aspect | train RM gain | eval RM gain | independent judge "
            "| judge change | alarm |" + (" seeds alarmed |" if per_seed else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if per_seed else "")]
    for m, rows in alarms.items():
        for r in rows:
            extra = ""
            if per_seed:
                alone = [any(x["aspect"] == r["aspect"] and x["alarm"] for x in rs)
                         for rs in per_seed[m].values()]
                extra = f" {sum(alone)} of {len(alone)} |"
            out.append(f"| {m} | {r['aspect']} | {r['train_rm_gain']:+.3f} | "
                       f"{signed(r['eval_rm_gain'])} | {r['judge']} | "
                       f"{signed(r['judge_change'])} | "
                       f"{'**ALARM**' if r['alarm'] else 'no'} |" + extra)
    out.append("")
    for m, rows in alarms.items():
        hits = [r["message"] for r in rows if r["alarm"]]
        out.append(f"- {m.upper()}: "
                   + ("possible reward hacking: " + "; ".join(hits) + "." if hits else
                      "no sign of reward hacking: where the training RM rose, the "
                      "independent measures moved with it."))
    out.append("")
    return out


def _reward_model_section(files: dict[str, Path]) -> list[str]:
    """The reward models' held-out figures: Pearson per aspect and the on-policy rankings;
    `files`: {name: the reward run's metrics.json} (those missing are left out)."""
    out = []
    for name, f in files.items():
        if not f.is_file():
            continue
        m = json.loads(f.read_text())
        if not out:
            out += ["## Reward models on held-out data", "",
                    "| reward model | "
                    + " | ".join(f"{a} Pearson (n)" for a in m.get("aspects", {}))
                    + " | refusal > compliance (harmful) | answer > refusal (benign) "
                    "| refusal > disclaimer+comply |",
                    "|---|" + "---|" * (len(m.get("aspects", {})) + 3)]
        cells = [f"{_fmt(v.get('pearson'))} ({v.get('n')})"
                 for v in m.get("aspects", {}).values()]
        op = m.get("on_policy") or {}
        for key in ("harmful_refusal_over_compliance", "benign_answer_over_refusal",
                    "disclaimer_probes"):
            v = op.get(key) or {}
            cells.append(f"{_fmt(v.get('pairwise_accuracy'))} (n={v.get('n', 0)})" if v else "n/a")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if out:
        out += ["", "The last three columns rank the policy's own completions to held-out "
                "training-set prompts (labels from the refusal labeller, docs/data.md): pairwise "
                "accuracy of safety (harmful) or actionability (benign).", ""]
    return out


def _examples(files: dict[str, Path], n: int,
              seed_of: dict[str, int] | None = None) -> list[str]:
    """Completions side by side; `files`: {model: its generations.jsonl}; `seed_of` (several
    seeds): the seed whose run each algorithm's column shows."""
    gens = {}
    for m, f in files.items():
        if f.is_file():
            gens[m] = {}
            for line in f.read_text().splitlines():
                r = json.loads(line)
                gens[m].setdefault((r["kind"], r["prompt"]), r["completion"])
    if not gens or "base" not in gens:
        return []
    out = ["## Examples (same prompts, first completion of each model)", ""]
    if seed_of:
        out += ["Each algorithm's column is its first seed's run ("
                + ", ".join(f"{m}: seed {seed_of[m]}" for m in gens if m in seed_of) + ").", ""]
    for kind in ("harmful", "benign"):
        keys = sorted(k for k in gens["base"]
                      if k[0] == kind and all(k in g for g in gens.values()))[:n]
        if not keys:
            continue
        out.append(f"| {kind} prompt | " + " | ".join(gens) + " |")
        out.append("|---|" + "---|" * len(gens))
        for k in keys:
            out.append(f"| {_cell(k[1], 120)} | "
                       + " | ".join(_cell(g[k]) for g in gens.values()) + " |")
        out.append("")
    return out
