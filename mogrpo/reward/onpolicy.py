"""Sampling a policy for on-policy reward data (the rows' labelling rules are in
mogrpo/data/onpolicy.py): `mogrpo reward data --from-policy RUN`."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

from mogrpo.data.onpolicy import label_rows


def sample_policy(model_ref: str, *, prompts: str = "default", samples: int = 2, guided: int = 2,
                  max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
                  max_prompts: int = 0,
                  batch_prompts: int = 16, precision: str = "auto", cache=None,
                  show_progress: bool = True,
                  openers: tuple[str, ...] | None = None):
    """Sample `samples` own + `guided` opener-started completions per training prompt.
    Returns (prompts [N], kinds [N], completions [N], guided flags [N])."""
    import torch
    from tqdm import tqdm

    from mogrpo.data.prompts import balanced_subset, load_prompt_set
    from mogrpo.models import autocast_dtype, cast_frozen_linears, resolve_model
    from mogrpo.rollout import REFUSAL_OPENERS, generate_rollout
    from mogrpo.runtime import Runtime

    if samples < 1:
        raise ValueError(f"samples = {samples}: at least one of the policy's own samples per "
                         f"prompt is needed")
    if guided < 0:
        raise ValueError(f"guided = {guided} must be >= 0")
    records = load_prompt_set(prompts, cache, "train")
    if max_prompts:
        records = balanced_subset(records, max_prompts, seed)
    model, tok, _ = resolve_model(model_ref, cache)
    device = Runtime().device  # as every trainer's
    model.to(device).eval()
    amp = autocast_dtype(device, precision)
    cast_frozen_linears(model, amp)
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    G = samples + guided
    out_p, out_k, out_c, out_g = [], [], [], []
    for start in tqdm(range(0, len(records), batch_prompts), desc="sampling",
                      disable=not show_progress):
        part = records[start:start + batch_prompts]
        with ctx():
            ro = generate_rollout(model, tok, [p.chat for p in part], [p.kind for p in part],
                                  group_size=G,
                                  max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                  step=0, first_index=start, guided=guided,
                                  openers=openers or REFUSAL_OPENERS)
        for i, c in enumerate(ro.completions):
            out_p.append(part[i // G].text)
            out_k.append(part[i // G].kind)
            out_c.append(c)
            out_g.append(bool(ro.guided[i]))
    return out_p, out_k, out_c, out_g


def make_onpolicy_data(model_ref: str, output: str | os.PathLike, *, cache=None, labeller=None,
                       show_progress: bool = True, **sample_kw) -> dict:
    """Sample the policy, label every completion, write labelled JSONL; returns a summary."""
    from mogrpo.data.loaders import write_jsonl
    from mogrpo.reward.labeller import RefusalLabeller

    out = Path(output)
    if out.exists() and out.is_dir():
        raise ValueError(f"{out} is a folder; --output names the JSONL file to write")
    prompts, kinds, comps, guided = sample_policy(model_ref, cache=cache,
                                                  show_progress=show_progress,
                                                  **sample_kw)
    labeller = labeller or RefusalLabeller.default(cache)
    q = labeller.refusal_prob(comps)
    rows = label_rows(prompts, kinds, comps, q, source=f"onpolicy/{model_ref}", guided=guided)
    write_jsonl(out, [r.to_dict(["safety", "actionability", "politeness",
                                 "meaningfulness"]) for r in rows])
    summary = {"rows": len(rows)}
    for kind in ("harmful", "benign"):
        for g in (False, True):
            sel = [float(x) >= 0.5 for x, k, gg in zip(q, kinds, guided) if k == kind and gg == g]
            if sel:
                summary[f"{kind}{'_guided' if g else ''}_refusal_share"] = round(
                    sum(sel) / len(sel), 3)
    return summary


def relabel_onpolicy_data(inputs: list[str | os.PathLike], output: str | os.PathLike, *, cache=None,
                          labeller=None) -> dict:
    """Relabel on-policy rows (files written by `make_onpolicy_data`) with the current refusal
    labeller and write them, concatenated, to `output`. The completions, prompts, kinds,
    sources and guided flags are kept; only P(refusal) and the labels that follow from it
    change. Use it when the labeller's own labels have grown (a round of maintainer labels on
    a trained policy's completions), so that old rows do not keep the old labeller's errors."""
    from mogrpo.data.loaders import iter_jsonl, write_jsonl
    from mogrpo.data.schema import DataError
    from mogrpo.reward.labeller import RefusalLabeller

    kept = []
    for path in inputs:
        for where, row in iter_jsonl(path):
            meta = row.get("meta") if isinstance(row, dict) else None
            if not isinstance(meta, dict) or meta.get("construction") != "onpolicy" or \
                    meta.get("kind") not in ("harmful",
                                             "benign") or not isinstance(row.get("response"),
                                                                         str) or \
                    not isinstance(row.get("prompt"), str) or \
                    not isinstance(meta.get("p_refusal"), (int, float)) or \
                    isinstance(meta.get("p_refusal"), bool):
                raise DataError(f"{where}: not an on-policy row (meta.construction 'onpolicy', "
                                f"meta.kind harmful "
                                f"or benign, meta.p_refusal a number, a prompt and a response); "
                                f"relabel only "
                                f"files from `mogrpo reward data`")
            kept.append(row)
    labeller = labeller or RefusalLabeller.default(cache)
    q = labeller.refusal_prob([r["response"] for r in kept])
    out = []
    for r, p in zip(kept, q):
        (row,) = label_rows([r["prompt"]], [r["meta"]["kind"]], [r["response"]], [p],
                            source=r.get("source", ""),
                            guided=[bool(r["meta"].get("guided",
                                                       False))] if "guided" in r["meta"] else None)
        out.append(row.to_dict(["safety", "actionability", "politeness", "meaningfulness"]))
    write_jsonl(output, out)
    changed = sum((float(a["meta"]["p_refusal"]) >= 0.5) != (float(p) >= 0.5) for a, p in zip(kept,
                                                                                              q))
    return {"rows": len(out), "verdicts_changed": changed}
