"""A quick policy evaluation with the training reward model: greedy completions of held-out
prompts, scored per aspect and by prompt kind. The full harness with independent judges
builds on this; training runs use it for their before/after figures.
"""

from __future__ import annotations

import math

import torch

from mogrpo.rl.advantages import weighted_sum
from mogrpo.rl.rollout import chat_texts


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64,
                       batch_size: int = 32, autocast_dtype: torch.dtype | None = None) -> list[str]:
    device = next(model.parameters()).device
    texts = chat_texts(tokenizer, prompts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
    out: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(
            device.type, enabled=False)
        with ctx:
            gen = model.generate(input_ids=enc["input_ids"].to(device),
                                 attention_mask=enc["attention_mask"].to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        dec = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, d in zip(idx, dec):
            out[i] = d.strip()
    if was_training:
        model.train()
    return out


def summarise(scorer, prompts: list[str], kinds: list[str], completions: list[str],
              weights: torch.Tensor) -> dict:
    """{kind: {n, aspects: {col: mean}, combined: mean}} with the scorer's n/a rules."""
    rewards = scorer.score(prompts, kinds, completions, group_size=1)[:, 0]  # [N, K']
    combined = weighted_sum(rewards, weights)  # [N]
    out = {}
    for kind in sorted(set(kinds)):
        rows = torch.tensor([k == kind for k in kinds])
        r = rewards[rows]
        out[kind] = {"n": int(rows.sum()),
                     "aspects": {c: _mean(r[:, j]) for j, c in enumerate(scorer.columns)},
                     "combined": _mean(combined[rows])}
    out["all"] = {"n": len(prompts), "combined": _mean(combined)}
    return out


def _mean(x: torch.Tensor) -> float | None:
    v = float(torch.nanmean(x.float())) if x.numel() else math.nan
    return None if math.isnan(v) else round(v, 5)


def evaluate_policy(acc, policy, tokenizer, scorer, prompt_records, weights: torch.Tensor, *,
                    max_new_tokens: int, autocast_dtype, out_file=None) -> dict:
    """Greedy completions of `prompt_records` (split over the processes), scored; the main
    process writes them to `out_file` (JSONL) when given. Returns `summarise`'s dict."""
    import json

    from mogrpo.config import atomic_write_text

    if not prompt_records:
        return {}
    texts = [p.text for p in prompt_records]
    kinds = [p.kind for p in prompt_records]
    mine = list(range(acc.process_index, len(texts), acc.num_processes))
    comps = greedy_completions(policy, tokenizer, [texts[i] for i in mine], max_new_tokens=max_new_tokens,
                               autocast_dtype=autocast_dtype)
    pairs = list(zip(mine, comps))
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)
    completions = [""] * len(texts)
    for i, c in pairs:
        completions[i] = c
    summary = summarise(scorer, texts, kinds, completions, weights)
    if acc.is_main_process and out_file is not None:
        rows = [{"id": p.id, "kind": p.kind, "prompt": p.text, "completion": c}
                for p, c in zip(prompt_records, completions)]
        atomic_write_text(out_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return summary
