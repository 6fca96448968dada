"""DPO baseline on the same engine: pairs from the reward model, then offline preference
optimisation against a frozen reference.

    pairs: N samples per training prompt from the reference policy -> score [B, N, K]
           -> combine with the GRPO weights -> best = chosen, worst = rejected (margin >= m)
    reference log-probs of every pair, once (cached)
    epochs over pairs: sigmoid DPO (arXiv 2305.18290) or IPO (arXiv 2310.12036) loss
    -> log -> checkpoint

The multi-objective handling is implicit: the K aspects are collapsed into one scalar
before the pair is built, which is exactly what the paper contrasts GRPO with. A user's
own preference data (JSONL with prompt/chosen/rejected, or PKU-SafeRLHF pairs) replaces
the sampled pairs. The cost includes generating and scoring the pairs.

Runs as one process or under `accelerate launch`: pair sampling, scoring and the reference
log-probs are shared out over the processes chunk by chunk and gathered back in order, and
each step's batch of pairs is split over them, so the result equals the single-process run.
Shapes: P pairs, T tokens, L response tokens, K aspects.
"""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mogrpo.config import atomic_write_text, field
from mogrpo.rl.advantages import weighted_sum
from mogrpo.rl.common import (PhaseTimer, PolicyRunConfig, all_sum, check_guided, close_run, load_latest_checkpoint,
                              load_prompt_set, log_metrics, open_metrics, peak_memory_mb, rollout_kwargs,
                              save_checkpoint, setup_run, step_prompt_indices, trainable_state)
from mogrpo.rl.losses import dpo_loss


@dataclass
class DPOConfig(PolicyRunConfig):
    """Config of `mogrpo train dpo` (YAML keys = field names; shared keys in PolicyRunConfig)."""

    pairs: str | None = field(None, help="own preference data: JSONL with prompt/chosen/rejected, or "
                                         "'hf:pku-saferlhf:<hub id or file>'; default: sample and score")
    pair_prompts: int = field(200, help="training prompts to sample pairs for (match GRPO: steps x B)")
    samples_per_prompt: int = field(4, help="N responses sampled per prompt to pick best/worst from")
    min_margin: float = field(0.05, help="skip pairs whose combined-score margin is at most this")
    generation_chunk: int = field(4, help="prompts per generate call while sampling pairs")
    beta: float = field(0.1, help="DPO beta (strength of the implicit KL)")
    loss_type: str = field("sigmoid", help="sigmoid (DPO) | ipo")
    epochs: int = field(2, help="passes over the pairs")
    batch_size: int = field(8, help="pairs per optimiser step")
    lr: float = field(5e-5, help="AdamW learning rate")
    warmup_steps: int = field(2, help="linear warm-up steps")
    grad_clip: float = field(1.0, help="max gradient norm (0 = off)")

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2 to pick a best and a worst response")
        check_guided(self.guided_samples, self.samples_per_prompt, "samples_per_prompt")
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        for name in ("epochs", "batch_size", "pair_prompts", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_new_tokens: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[P, T] input ids and attention mask (prompt left-padded, response right-padded) and the
    response mask [P, L]; the layout `completion_logprobs` expects. Responses end with EOS."""
    from mogrpo.rl.rollout import chat_texts

    p = tokenizer(chat_texts(tokenizer, prompts), add_special_tokens=False)["input_ids"]
    r = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    r = [(ids[:max_new_tokens - 1] + [eos]) for ids in r]
    P, L = max(len(x) for x in p), max(len(x) for x in r)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (P - len(a)) + a + b + [pad] * (L - len(b)) for a, b in zip(p, r)])
    attn = torch.tensor([[0] * (P - len(a)) + [1] * (len(a) + len(b)) + [0] * (L - len(b)) for a, b in zip(p, r)])
    rmask = torch.tensor([[1] * len(b) + [0] * (L - len(b)) for b in r])
    return ids, attn, rmask


def sequence_logprob(model, tokenizer, prompts, responses, max_new_tokens, amp_ctx,
                     return_lengths: bool = False):
    """Summed log-prob [P] of each response given its prompt (and its token count [P])."""
    from mogrpo.rl.rollout import completion_logprobs

    device = next(model.parameters()).device
    ids, attn, rmask = encode_pairs(tokenizer, prompts, responses, max_new_tokens)
    with amp_ctx():
        logp, _ = completion_logprobs(model, ids.to(device), attn.to(device), rmask.shape[1])
    total = (logp * rmask.to(device)).sum(-1)
    return (total, rmask.sum(-1).to(device)) if return_lengths else total


def load_pairs_file(spec: str) -> list[dict]:
    from mogrpo.data.loaders import iter_jsonl
    from mogrpo.data.schema import DataError

    if spec.startswith("hf:"):
        from mogrpo.data.hf import load_hf_pairs

        _, adapter, source = spec.split(":", 2)
        if adapter != "pku-saferlhf":
            raise DataError(f"pairs {spec!r}: only hf:pku-saferlhf:<id or file> has preference pairs")
        return list(load_hf_pairs(source))
    out = []
    for where, row in iter_jsonl(spec):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise DataError(f"{where}: a pair needs string fields 'prompt', 'chosen' and 'rejected'")
        out.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
    return out


DPO_STATS = ("loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")


def train_dpo(cfg: DPOConfig, output: str | os.PathLike, *, resume: bool = False,
              show_progress: bool = True) -> dict:
    """Runs as one process or under `accelerate launch` (DDP): pair sampling and scoring,
    and the reference log-probs, are shared out over the processes in the same chunks as
    one process uses (so the same seeds and the same numbers), then gathered in order;
    each optimiser step's batch of pairs is split over the processes, each local mean
    loss weighted by its share (x processes, as DDP averages), so the update is the
    single-process one."""
    from accelerate.utils import gather_object
    from transformers import get_scheduler

    from mogrpo.eval.quick import evaluate_policy
    from mogrpo.rl.rollout import generate_rollout

    t_start = time.time()
    run = setup_run(cfg, output)
    acc, world, rank, main = run.acc, run.world, run.rank, run.main
    out, scorer, weights, amp, amp_ctx = run.out, run.scorer, run.weights, run.amp, run.amp_ctx
    policy, tok, ref_model, eval_prompts = run.model, run.tok, run.ref_model, run.eval_prompts
    sum_ = all_sum(acc)
    timer = PhaseTimer()

    def reference():
        return policy.disable_adapter() if ref_model is None else nullcontext()

    ref_net = policy if ref_model is None else ref_model

    # ---- pairs (sampled from the reference and scored, or the user's), cached in the run folder
    pairs_path = out / "pairs.jsonl"
    tokens_generated = 0
    if resume and pairs_path.is_file():
        pairs = [json.loads(x) for x in pairs_path.read_text().splitlines()]
    elif cfg.pairs:
        pairs = load_pairs_file(cfg.pairs)
    else:
        prompts = load_prompt_set(cfg.train_prompts, cfg.cache_dir, "train")
        chosen_idx = step_prompt_indices([p.kind for p in prompts], cfg.pair_prompts, 0, cfg.seed,
                                         cfg.balance_kinds)
        pool = [prompts[i] for i in chosen_idx]
        found_here, skipped, n_tokens = [], 0, 0  # (index in pool, pair) of this process's chunks
        from mogrpo.rl.pairs import best_worst_pairs

        # Chunks go round-robin to the processes; each is seeded by its first prompt's index,
        # as with one process, so the pairs do not depend on the number of processes.
        starts = list(range(0, len(pool), cfg.generation_chunk))[rank::world]
        bar = tqdm(starts, desc="dpo pairs", disable=not (show_progress and main))
        for start in bar:
            part = pool[start:start + cfg.generation_chunk]
            with timer("generation"), reference(), amp_ctx():
                ro = generate_rollout(ref_net, tok, [p.text for p in part], [p.kind for p in part],
                                      group_size=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                      temperature=cfg.temperature, seed=cfg.seed, step=0, first_index=start,
                                      **rollout_kwargs(cfg))
            n_tokens += int(ro.completion_mask.sum())
            with timer("scoring"):
                rewards = scorer.score(ro.prompts, ro.kinds, ro.completions, cfg.samples_per_prompt)
            combined = weighted_sum(rewards, weights)  # [b, N]
            found, sk = best_worst_pairs(combined, cfg.min_margin)
            skipped += sk
            for b, i, j in found:
                n = cfg.samples_per_prompt
                found_here.append((start + b, {
                    "prompt": ro.prompts[b], "kind": ro.kinds[b], "chosen": ro.completions[b * n + i],
                    "rejected": ro.completions[b * n + j], "margin": float(combined[b, i] - combined[b, j])}))
        counts = sum_(torch.tensor([skipped, n_tokens], device=acc.device))
        skipped, tokens_generated = int(counts[0]), int(counts[1])
        pairs = [p for _, p in sorted(gather_object(found_here), key=lambda x: x[0])]  # one-process order
        if main:
            print(f"dpo: {len(pairs)} pairs from {len(pool)} prompts ({skipped} skipped: margin <= "
                  f"{cfg.min_margin} or too few scored samples)")
    if not pairs:
        raise ValueError("no preference pairs: lower min_margin or sample more responses per prompt")
    acc.wait_for_everyone()  # every process has decided where its pairs come from
    if main:
        atomic_write_text(pairs_path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))

    # ---- reference log-probs, once: chunks of batch_size round-robin over the processes, gathered
    with timer("reference"), torch.no_grad(), reference():
        mine = []
        for c in range(rank, (len(pairs) + cfg.batch_size - 1) // cfg.batch_size, world):
            chunk = pairs[c * cfg.batch_size:(c + 1) * cfg.batch_size]
            ps = [p["prompt"] for p in chunk]
            mine.append((c, sequence_logprob(ref_net, tok, ps, [p["chosen"] for p in chunk], cfg.max_new_tokens,
                                             amp_ctx).cpu(),
                         sequence_logprob(ref_net, tok, ps, [p["rejected"] for p in chunk], cfg.max_new_tokens,
                                          amp_ctx).cpu()))
        parts = sorted(gather_object(mine), key=lambda x: x[0])
        ref_c, ref_r = torch.cat([x[1] for x in parts]), torch.cat([x[2] for x in parts])

    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr)
    steps_per_epoch = (len(pairs) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    sched = get_scheduler("linear", opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
    model, opt, sched = acc.prepare(policy, opt, sched)
    start_step = 0
    eval_before = None
    ckpt_root = out / "checkpoints"
    state = load_latest_checkpoint(ckpt_root, policy, opt, sched) if resume else None
    if state is not None:
        start_step, eval_before = state["step"], state.get("eval_before")
        timer.seconds, tokens_generated = state["cost_seconds"], state["tokens_generated"]
    if eval_before is None:
        with timer("evaluation"):
            eval_before = evaluate_policy(acc, policy, tok, scorer, eval_prompts, weights,
                                          max_new_tokens=cfg.eval_max_new_tokens, autocast_dtype=amp,
                                          out_file=out / "eval_before_generations.jsonl")
    metrics_path, writer = open_metrics(out, main, resume)
    bar = tqdm(range(start_step, total), desc="dpo", disable=not (show_progress and main), initial=start_step,
               total=total)
    model.train()
    for step in bar:
        t0 = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)
        order = list(range(len(pairs)))
        random.Random(cfg.seed * 7919 + epoch).shuffle(order)
        batch = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]  # the global batch of pairs
        idx = batch[rank::world]
        # Local mean loss x world x (local pairs / batch pairs): DDP's average is the batch mean.
        # A process with no pair of this (short, last) batch runs one with weight 0, so that
        # the gradient all-reduce has every process.
        weight = world * len(idx) / len(batch)
        idx = idx or batch[:1]
        chunk = [pairs[i] for i in idx]
        ps = [p["prompt"] for p in chunk]
        with timer("policy_forward_backward"):
            pc, lc = sequence_logprob(model, tok, ps, [p["chosen"] for p in chunk], cfg.max_new_tokens, amp_ctx,
                                      return_lengths=True)
            pr, lr_ = sequence_logprob(model, tok, ps, [p["rejected"] for p in chunk], cfg.max_new_tokens,
                                       amp_ctx, return_lengths=True)
            loss, st = dpo_loss(pc.float(), pr.float(), ref_c[idx].to(pc.device), ref_r[idx].to(pc.device),
                                beta=cfg.beta, loss_type=cfg.loss_type, chosen_len=lc.float(),
                                rejected_len=lr_.float())
            opt.zero_grad(set_to_none=True)
            acc.backward(loss * weight)
            # after backward, so on the all-reduced gradients: the global norm
            grad_norm = acc.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
            opt.step()
            sched.step()
        st_sum = sum_(torch.tensor([st[key] * weight / world for key in DPO_STATS], dtype=torch.float64,
                                   device=acc.device)).cpu()
        st = dict(zip(DPO_STATS, st_sum.tolist()))
        rec = {"step": step + 1, "epoch": epoch + 1, **st, "grad_norm": float(grad_norm),
               "lr": sched.get_last_lr()[0], "step_seconds": round(time.perf_counter() - t0, 3),
               "peak_memory_mb": round(peak_memory_mb(acc.device), 1)}
        if main:
            log_metrics(metrics_path, writer, rec)
            bar.set_postfix(loss=f"{st['loss']:.4f}", acc=f"{st['reward_accuracy']:.2f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            acc.wait_for_everyone()
            if main:
                save_checkpoint(ckpt_root / f"step-{step + 1:06d}", policy, tok, {
                    "step": step + 1, "trainable": trainable_state(policy),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "cost_seconds": dict(timer.seconds), "tokens_generated": tokens_generated,
                    "eval_before": eval_before}, cfg.keep_checkpoints)
            acc.wait_for_everyone()
    bar.close()
    return close_run(acc, writer, lambda: evaluate_policy(acc, policy, tok, scorer, eval_prompts, weights,
                                                          max_new_tokens=cfg.eval_max_new_tokens, autocast_dtype=amp,
                                                          out_file=out / "eval_after_generations.jsonl"),
                     eval_before, out, policy, tok, t_start=t_start, timer=timer, amp=amp,
                     tokens_generated=tokens_generated, pairs=len(pairs), steps=total)
