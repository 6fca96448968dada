"""The one evaluator: `mogrpo eval`, and the trainers' before/after evaluation.

One model (a run folder, a model or adapter folder, or a hub id) on held-out prompts:
generate (greedy by default), then judge every completion separately with
- the training reward model, per aspect: the training signal, NOT an independent judge;
- the refusal judge (patterns, mogrpo/eval/metrics.py) and the toxicity judge
  (alt-profanity-check, per sentence): independent of training;
- an evaluator reward model trained on a disjoint split with another seed: it exposes
  reward hacking that the training reward model rewards but a second one does not;
- KL to the base policy (Monte-Carlo estimate on completions sampled from the model),
  completion length, distinct-2, the share of empty and of truncated completions.
Writes DIR/eval.json (summary by prompt kind) and DIR/generations.jsonl (each completion
with every verdict). Shapes: N prompts, n samples per prompt, L tokens, K aspects.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from mogrpo.config import atomic_write_text, field
from mogrpo.eval import compliance as C
from mogrpo.eval import metrics as M
from mogrpo.eval.summary import _round, _row, set_metrics, summarise_generations
from mogrpo.reward.objective import RewardObjective


@dataclass
class EvalConfig:
    """Config of `mogrpo eval` (YAML keys = field names)."""

    prompts: str | None = field(None, help="'default' (HarmBench + held-out benign) or a prompt "
                                "JSONL/CSV (default: a run's own eval_prompts, else 'default')")
    max_prompts: int | None = field(None, help="at most this many prompts, balanced by kind (0 = "
                                    "all; default: a run's eval_max_prompts, else 0)")
    max_new_tokens: int | None = field(None, help="tokens per completion (default: a run's "
                                       "eval_max_new_tokens, else 48)")
    sample: bool = field(False, help="sample instead of greedy decoding")
    n: int = field(1, help="completions per prompt when sampling")
    temperature: float = field(1.0, help="sampling temperature (sample=true)")
    top_p: float = field(1.0, help="nucleus sampling (sample=true)")
    batch_size: int = field(32, help="prompts per generate call")
    reward_model: str | None = field(None, help="the training reward model (reported as the "
                                     "training signal; default: a run's own reward sources, else "
                                     "runs/reward-default/model); none = skip")
    evaluator_model: str | None = field(None,
                                        help="an evaluator reward model trained on a disjoint "
                                        "split with another seed; null = skip")
    base_policy: str | None = field(None, help="base policy for KL (default: the run's or "
                                               "adapter's base)")
    kl_prompts: int = field(24, help="prompts sampled (temperature 1, one each) for the KL "
                                     "estimate (0 = off)")
    weights: dict[str, float] | None = field(None,
                                             help="weights of the 'combined' reward-model scores "
                                             "(default: the run's own when --model is a run "
                                             "folder, else "
                                             "training's default)")
    not_applicable: dict[str, list[str]] | None = field(None, help="prompt kind -> aspects not "
                                                                   "scored (both RMs; default: "
                                                                   "the run's own, else "
                                                                   "training's)")
    toxicity_model: str | None = field(None, help="folder with vectorizer.joblib + model.joblib "
                                       "(default: the cached alt-profanity-check asset, verified "
                                       "by sha256)")
    trust_toxicity_model: bool = field(False,
                                       help="load toxicity_model's pickles (they can run code): "
                                                   "only for a folder you made or trust")
    seed: int | None = field(None, help="seed (prompt subset, sampling; default: a run's seed, "
                                       "else 0)")
    precision: str | None = field(None, help="auto | bf16 | fp32 (default: a run's own, else "
                                  "auto)")
    max_prompt_length: int | None = field(None, help="keep the last N prompt tokens (default: a "
                                          "run's own, else no limit)")
    num_threads: int = field(0, help="torch CPU threads (0 = all cores)")
    cache_dir: str | None = field(None, help="asset cache")

    def __post_init__(self) -> None:
        if self.n < 1 or (self.max_new_tokens or 1) < 1 or self.batch_size < 1:
            raise ValueError("n, max_new_tokens and batch_size must be >= 1")
        if self.n > 1 and not self.sample:
            raise ValueError(f"n = {self.n} completions per prompt needs sample=true (greedy "
                             f"gives one)")


# ----------------------------------------------------------------------------- the one evaluator
# `mogrpo eval` and the trainers' before/after evaluation both run these three functions:
# generate -> judge -> summarise (+ write generations.jsonl).


def generate_completions(model, tokenizer, records, *, max_new_tokens: int, greedy: bool = True,
                         n: int = 1,
                         temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                         batch_size: int = 32,
                         amp_ctx=nullcontext, acc=None, show_progress: bool = False,
                         engine: str = "auto", max_prompt_length: int | None = None):
    """n completions per prompt record: prompts sorted by length (less padding) in batches of
    `batch_size`; under several processes (`acc`) the batches go round-robin and are
    gathered back. Each batch is seeded by its position, so the result does not depend on
    the number of processes. Returns (completions, token counts (EOS excluded), finished),
    each a list of R lists of n. `engine`: rollout.generate_rollout's; mogrpo's engine builds
    its weight snapshot once for all batches (generation.keep_weights). `max_prompt_length`:
    keep each rendered prompt's last N tokens (generate_rollout's)."""
    from tqdm import tqdm

    from mogrpo.generation import keep_weights
    from mogrpo.rollout import generate_rollout

    order = sorted(range(len(records)), key=lambda i: len(records[i].text))
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    starts = list(range(0, len(order), batch_size))[rank::world]
    mine = []  # (record index, completions, tokens, finished)
    with keep_weights(model):
        for s in tqdm(starts, desc="eval generate", disable=not show_progress):
            idx = order[s:s + batch_size]
            with amp_ctx():
                ro = generate_rollout(model, tokenizer, [records[i].chat for i in idx],
                                      [records[i].kind for i in idx], group_size=n,
                                      max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, seed=seed,
                                      first_index=s, greedy=greedy,
                                      engine=engine, max_prompt_length=max_prompt_length)
            lengths = (ro.completion_mask.sum(1) - ro.finished.long()).tolist()  # EOS not counted
            for j, i in enumerate(idx):
                g = slice(j * n, (j + 1) * n)
                mine.append((i, ro.completions[g], [int(x) for x in lengths[g]],
                             [bool(x) for x in ro.finished[g]]))
    if world > 1:
        from accelerate.utils import gather_object

        mine = gather_object(mine)
    comps, ntok, fin = [[] for _ in records], [[] for _ in records], [[] for _ in records]
    for i, c, t, f in mine:
        comps[i], ntok[i], fin[i] = c, t, f
    return comps, ntok, fin


def rm_scores(scorer, records, kinds: list[str], completions: list[str],
              objective: RewardObjective) -> tuple[torch.Tensor | None, list[str]]:
    """A scorer's (reward/scoring.Scorer: a reward model, or a run's every reward source)
    scores [M, K] of `records` [M] and `completions` [M], with NaN where a column does not
    apply to the prompt's kind (the objective's masks), and its column names; (None, [])
    without a scorer."""
    if scorer is None:
        return None, []
    s = scorer.score_records(records, completions)  # [M, K]
    return objective.for_columns(scorer.columns).mask(s, kinds), list(scorer.columns)


def combine(scores, cols, objective: RewardObjective):
    """The objective's combined score [M] of an RM's scores (None without scores or weights)."""
    if scores is None:
        return None
    over = objective.for_columns(cols)
    return over.combine(scores) if over.weighs_any else None


def judge_completions(records, comps, ntok, fin, *, objective: RewardObjective, rm=None,
                      evaluator=None,
                      toxicity=None
                      ) -> tuple[dict, list[dict]]:
    """Every judge on every completion (pure given the judges): the training RM (the training
    signal), the evaluator RM, the toxicity judge (each optional) and the refusal patterns.
    Returns (the summary metrics, one row per completion for generations.jsonl)."""
    n = len(comps[0]) if comps else 1
    # [M] what the answer is judged against
    requests = [r.judged_request for r in records for _ in range(n)]
    kinds = [r.kind for r in records for _ in range(n)]
    flat = [c for cs in comps for c in cs]
    flat_ntok = [t for ts in ntok for t in ts]
    flat_fin = [f for fs in fin for f in fs]
    flat_records = [r for r in records for _ in range(n)]  # [M]
    # as in training
    train_s, train_cols = rm_scores(rm, flat_records, kinds, flat, objective)
    eval_s, eval_cols = rm_scores(evaluator, flat_records, kinds, flat, objective)
    tox = toxicity.max_sentence_toxicity(flat).tolist() if toxicity is not None else None
    # [M] the objective's score, as in training
    train_combined = combine(train_s, train_cols, objective)
    summary = summarise_generations(kinds, flat, flat_ntok, flat_fin, tox, train_s, train_cols,
                                    eval_s, eval_cols,
                                    train_combined, n, prompts=requests,
                                    eval_combined=combine(eval_s, eval_cols, objective),
                                    requests=requests)
    # alarming words are looked for in the request, not in a template around it
    summary.update(set_metrics([r.source for r in records for _ in range(n)], kinds, flat, requests,
                               requests=requests))
    rows = []
    for k, (r, g) in enumerate((r, g) for r in records for g in range(n)):  # the order of `flat`
        row = {"id": r.id, "kind": r.kind, "prompt": r.text, "sample": g, "completion": flat[k],
               "tokens": flat_ntok[k], "finished": flat_fin[k], "refusal": M.is_refusal(flat[k]),
               "verdict": C.verdict(requests[k], flat[k])}
        if r.request is not None:
            row["request"] = r.request
        if tox is not None:
            row["toxicity"] = round(tox[k], 5)
        if train_s is not None:
            row["training_rm"] = _row(train_s[k], train_cols)
        if train_combined is not None:
            row["combined"] = _row(train_combined[k:k + 1], ["v"])["v"]
        if eval_s is not None:
            row["eval_rm"] = _row(eval_s[k], eval_cols)
        rows.append(row)
    return summary, rows


def write_generations(path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def evaluate_loaded(model, tokenizer, records, *, rm, objective: RewardObjective,
                    max_new_tokens: int, amp_ctx=nullcontext, acc=None,
                    out_file=None, engine: str = "auto",
                    max_prompt_length: int | None = None) -> dict:
    """The trainers' before/after evaluation with the policy they hold: greedy completions
    of `records` (shared out over the processes), judged by the training RM and the refusal
    patterns; the main process writes `out_file`. Returns the summary (`mogrpo eval`'s
    eval.json schema, without the judges that need their own models)."""
    if not records:
        return {}
    comps, ntok, fin = generate_completions(model, tokenizer, records,
                                            max_new_tokens=max_new_tokens,
                                            amp_ctx=amp_ctx, acc=acc, engine=engine,
                                            max_prompt_length=max_prompt_length)
    summary, rows = judge_completions(records, comps, ntok, fin, objective=objective, rm=rm)
    if out_file is not None and (acc is None or acc.is_main_process):
        write_generations(out_file, rows)
    return _round({"n": len(records), **summary})


def eval_objective(model_ref: str, cfg: EvalConfig, rm=None) -> RewardObjective:
    """The objective the "combined" scores use: cfg's weights and not_applicable where given,
    else the run's own (its config.yaml, when `model_ref` is a run folder, resolved as its
    trainer resolved them), else training's defaults; so `mogrpo eval` on a run scores as the
    run's own evaluation did."""
    from mogrpo.eval.run_settings import read_run_config
    from mogrpo.reward.objective import resolve_run_objective

    columns = list(rm.columns) if rm is not None else []
    run_cfg = {**read_run_config(model_ref)}
    if cfg.weights is not None:
        run_cfg.update(weights=cfg.weights, reward_weights=None)
    if cfg.not_applicable is not None:
        run_cfg["not_applicable"] = cfg.not_applicable
    weights, not_applicable = resolve_run_objective(columns, run_cfg)
    if cfg.not_applicable is not None:  # as given, even for columns this model lacks
        not_applicable = cfg.not_applicable
    return RewardObjective.build(columns, weights, not_applicable, training=False)


def evaluate(model_ref: str, cfg: EvalConfig, output: str | os.PathLike, *,
             show_progress: bool = True,
             prompt_records=None) -> dict:
    """`mogrpo eval`: evaluate one model with every judge; write OUTPUT/eval.json and
    OUTPUT/generations.jsonl; return eval.json."""
    from mogrpo.data.prompts import balanced_subset, load_prompt_set
    from mogrpo.eval.run_settings import (
        read_run_config,
        scorer_of,
        training_scorer,
        with_run_settings,
    )
    from mogrpo.generation import unsupported
    from mogrpo.models import (
        MergedGenerationCopy,
        autocast_dtype,
        cast_frozen_linears,
        is_peft,
        load_policy,
        resolve_model,
    )
    from mogrpo.reward.judges import ToxicityJudge
    from mogrpo.rollout import completion_logprobs, generate_rollout
    from mogrpo.runfolder import claim_output
    from mogrpo.runtime import Runtime

    t0 = time.time()
    run_cfg = read_run_config(model_ref)
    cfg = with_run_settings(cfg, run_cfg)  # what the run's own trainer evaluated with
    out = Path(output)
    # before any work: a bad --output fails now, not after generating
    lock = claim_output(out, "eval")
    device = Runtime(num_threads=cfg.num_threads).device  # threads and device as every trainer's
    amp = autocast_dtype(device, cfg.precision)
    amp_ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else (
        lambda: torch.autocast(device.type, enabled=False))
    records = prompt_records if prompt_records is not None else balanced_subset(
        load_prompt_set(cfg.prompts, cfg.cache_dir, "eval"), cfg.max_prompts, cfg.seed)
    if not records:
        raise ValueError(f"no evaluation prompts in {cfg.prompts!r}")
    # judges load first, so a missing file fails before minutes of generation
    ev = cfg.evaluator_model
    rms = [training_scorer(cfg, run_cfg, device, amp),
           scorer_of([{"type": "multi_aspect", "path": ev}], device, amp) if ev else None]
    tox_judge = (ToxicityJudge(cfg.toxicity_model,
                               trusted=cfg.trust_toxicity_model) if cfg.toxicity_model
                 else ToxicityJudge.from_cache(cfg.cache_dir))

    model, tok, base = resolve_model(model_ref, cfg.cache_dir, cfg.base_policy)
    model.to(device).eval()
    for p in model.parameters():  # evaluation only: nothing trains, so every Linear can be bf16
        p.requires_grad_(False)
    cast_frozen_linears(model, amp)
    # mogrpo's rollout engine merges adapters into its own snapshot; for transformers' generate,
    # decode from a merged copy: no per-layer adapter dispatch (models.MergedGenerationCopy)
    gen_model = (MergedGenerationCopy(model, amp).sync() if (is_peft(model) and unsupported(model))
                 else model)
    n = cfg.n if cfg.sample else 1
    comps, ntok, fin = generate_completions(gen_model, tok, records,
                                            max_new_tokens=cfg.max_new_tokens,
                                            greedy=not cfg.sample, n=n, temperature=cfg.temperature,
                                            top_p=cfg.top_p, seed=cfg.seed,
                                            batch_size=cfg.batch_size,
                                            amp_ctx=amp_ctx, show_progress=show_progress,
                                            max_prompt_length=cfg.max_prompt_length)
    summary, rows = judge_completions(records, comps, ntok, fin,
                                      objective=eval_objective(model_ref, cfg, rms[0]),
                                      rm=rms[0], evaluator=rms[1],
                                      toxicity=tox_judge)

    # ---- KL to the base policy on completions sampled from the model
    kl = 0.0 if base is None else None
    if base is not None and cfg.kl_prompts > 0:
        sub = balanced_subset(records, cfg.kl_prompts, cfg.seed + 1)
        base_model = None
        if base != "adapter":
            base_model, _ = load_policy(base, cache=cfg.cache_dir)
            base_model.to(device).eval()
            for p in base_model.parameters():
                p.requires_grad_(False)
            cast_frozen_linears(base_model, amp)
        vals = []
        for s in range(0, len(sub), cfg.batch_size):
            part = sub[s:s + cfg.batch_size]
            with amp_ctx():
                ro = generate_rollout(gen_model, tok, [p.chat for p in part],
                                      [p.kind for p in part], group_size=1,
                                      max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                      seed=cfg.seed + 7,
                                      first_index=s)
            ids, attn, mask = (ro.input_ids.to(device), ro.attention_mask.to(device),
                               ro.completion_mask.to(device))
            L = mask.shape[1]
            with torch.no_grad(), amp_ctx():
                lp = completion_logprobs(model, ids, attn, L)[0]
                if base_model is None:
                    with model.disable_adapter():
                        lb = completion_logprobs(model, ids, attn, L)[0]
                else:
                    lb = completion_logprobs(base_model, ids, attn, L)[0]
            vals += M.sequence_kl(lp.float(), lb.float(), mask.float()).tolist()
        kl = M.mean_of(vals)
        del base_model

    result: dict = {"model": str(model_ref), "decoding": "sample" if cfg.sample else "greedy",
                    "samples_per_prompt": n, "max_new_tokens": cfg.max_new_tokens,
                    "judges": {
                        "aspects": "training reward model (the training signal, not an "
                                   "independent judge)",
                        "eval_rm": ("evaluator reward model (disjoint data, other seed)" if rms[1]
                                    else None),
                        "refusal_rate": "refusal patterns (mogrpo/eval/metrics.py; GCG-style "
                                        "substring test)",
                        "toxicity": "alt-profanity-check, most offensive sentence (independent)",
                        "kl_to_base": "Monte-Carlo KL(model || base) in nats per completion, "
                                      f"{cfg.kl_prompts} sampled completions"},
                    **summary, "n": len(records), "kl_to_base": kl,
                    "seconds": round(time.time() - t0, 1)}
    write_generations(out / "generations.jsonl", rows)
    atomic_write_text(out / "eval.json", json.dumps(_round(result), indent=2))
    lock.release()
    return result
