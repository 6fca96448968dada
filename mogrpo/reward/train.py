"""Training the multi-aspect reward model by masked regression.

One loop, top to bottom: data -> model -> AdamW with warm-up -> epochs of
(train, validate, early-stop check, checkpoint) -> restore the best epoch -> test metrics
-> save. Unlabelled cells (NaN) are masked out of the loss (`masked_regression_loss`).
Every epoch writes a resumable checkpoint atomically; `resume=True` continues from it.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from mogrpo.config import atomic_write_text, save_config
from mogrpo.data.schema import LabelledResponse
from mogrpo.models import autocast_dtype
from mogrpo.reward.config import RewardTrainConfig
from mogrpo.reward.loss import masked_regression_loss
from mogrpo.reward.metrics import aspect_metrics
from mogrpo.reward.model import MultiAspectRewardModel
from mogrpo.reward.sanity import run_sanity


def on_policy_validation(model: MultiAspectRewardModel, rows: list[LabelledResponse], seed: int = 0,
                         refusal_at: float = 0.6, comply_at: float = 0.4) -> dict:
    """How the reward model ranks the policy's own outputs on held-out prompts (`rows`: the
    test split). Labels are the refusal labeller's: a refusal has P(refusal) >= `refusal_at`,
    a compliant answer <= `comply_at` (the uncertain middle is left out).

    - harmful_refusal_over_compliance: per harmful prompt, every (refusal, compliant answer)
      pair; correct when safety ranks the refusal higher;
    - benign_answer_over_refusal: per benign prompt, every (answer, refusal) pair; correct
      when actionability ranks the answer higher;
    - disclaimer_probes: a compliant answer behind a held-out disclaimer (PROBE_DISCLAIMERS,
      never trained on) against each refusal to the same prompt; correct when safety ranks
      the refusal higher.
    Each: {"pairwise_accuracy", "n"} (accuracy None when n = 0)."""
    from collections import defaultdict

    from mogrpo.data.onpolicy import PROBE_DISCLAIMERS

    groups: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: {"refusal": [],
                                                                               "answer": []})
    for r in rows:
        if r.meta.get("construction") != "onpolicy":
            continue
        q = r.meta.get("p_refusal")
        if q is None or r.meta.get("kind") not in ("harmful", "benign"):
            continue
        side = "refusal" if q >= refusal_at else "answer" if q <= comply_at else None
        if side:
            groups[(r.meta["kind"], r.prompt)][side].append(r.response)
    rng = random.Random(seed)
    pairs = {"harmful_refusal_over_compliance": [], "benign_answer_over_refusal": [],
             "disclaimer_probes": []}
    for (kind, prompt), g in groups.items():
        for ref in g["refusal"]:
            for ans in g["answer"]:
                if kind == "harmful":
                    pairs["harmful_refusal_over_compliance"].append((prompt, ref, ans))
                    pairs["disclaimer_probes"].append((prompt, ref,
                                                       f"{rng.choice(PROBE_DISCLAIMERS)} {ans}"))
                else:
                    pairs["benign_answer_over_refusal"].append((prompt, ans, ref))
    aspect = {"harmful_refusal_over_compliance": "safety", "disclaimer_probes": "safety",
              "benign_answer_over_refusal": "actionability"}
    out = {}
    for name, ps in pairs.items():
        a = aspect[name]
        if not ps or a not in model.aspects:
            out[name] = {"pairwise_accuracy": None, "n": len(ps) if a in model.aspects else 0}
            continue
        k = model.aspects.index(a)
        prompts = [p for p, _, _ in ps] * 2
        texts = [hi for _, hi, _ in ps] + [lo for _, _, lo in ps]
        s = model.score(prompts, texts)[:, k]
        hi, lo = s[:len(ps)], s[len(ps):]
        out[name] = {"pairwise_accuracy": round(float((hi > lo).float().mean()), 4), "n": len(ps),
                     "mean_margin": round(float((hi - lo).mean()), 4), "aspect": a}
    # Tone spread: how far apart safety puts two compliant answers to the same harmful prompt,
    # next to how far it puts a refusal above them (docs/theory.md section 7). GRPO's group
    # normalisation turns both into pushes of the same scale, so a spread near the margin means
    # the update is as much about tone as about refusing.
    same = [(p, g["answer"][0], g["answer"][1]) for (kind, p), g in groups.items()
            if kind == "harmful" and len(g["answer"]) >= 2]
    if same and "safety" in model.aspects:
        k = model.aspects.index("safety")
        s = model.score([p for p, _, _ in same] * 2, [a for _, a, _ in same] + [b for _, _,
                                                                                b in same])[:, k]
        spread = float((s[:len(same)] - s[len(same):]).abs().mean())
        margin = (out.get("harmful_refusal_over_compliance") or {}).get("mean_margin")
        out["harmful_compliance_spread"] = {"mean_abs_difference": round(spread, 4), "n": len(same),
                                            "margin_over_spread": round(margin / spread, 3)
                                            if margin is not None and spread > 0 else None}
    return out


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int,
                           group: int = 50) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths.

    Shuffle, cut into groups of `group` batches, sort each group by length, slice it into
    batches, shuffle the batches. Padding waste drops (most pairs are shorter than the
    maximum), while every epoch still sees every row once in a seed-determined order.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = batch_size * group
    for start in range(0, len(order), span):
        part = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _labels(rows: list[LabelledResponse], aspects: list[str]) -> torch.Tensor:
    return torch.tensor([r.label_vector(aspects) for r in rows], dtype=torch.float32)  # [N, K]


@torch.no_grad()
def evaluate(model: MultiAspectRewardModel, rows: list[LabelledResponse], weights: torch.Tensor,
             batch_size: int) -> tuple[float, np.ndarray, np.ndarray, int]:
    """(masked loss, predictions [N, K], labels [N, K], n_truncated) on `rows`."""
    if not rows:
        k = len(model.aspects)
        return float("nan"), np.zeros((0, k)), np.zeros((0, k)), 0
    pred, n_trunc = model.score([r.prompt for r in rows], [r.response for r in rows],
                                batch_size=batch_size, return_truncated=True)
    target = _labels(rows, model.aspects)
    loss, _ = masked_regression_loss(pred, target, weights)
    return float(loss), pred.numpy(), target.numpy(), n_trunc


def _param_groups(model: MultiAspectRewardModel, cfg: RewardTrainConfig) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.backbone.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        {"params": list(model.head.parameters()), "lr": cfg.head_lr, "weight_decay": 0.0},
    ]


# Keys a resumed run takes from the new command; any other changed key keeps the run's value.
RESUME_MAY_CHANGE = {"epochs", "patience", "eval_batch_size", "num_threads", "cache_dir", "device",
                     "keep_state",
                     "report_to"}
# the newest epoch checkpoints kept: the previous one is the fallback if the newest is damaged
KEEP_STATES = 2


def train_reward_model(cfg: RewardTrainConfig, output: str | os.PathLike, *, resume: bool = False,
                       show_progress: bool = True, overwrite: bool = False) -> dict:
    """Train, validate, early-stop, test and save. Returns the metrics dict (also metrics.json)."""
    from mogrpo.assets import resolve_model_ref
    from mogrpo.checkpointing import latest_checkpoint, move_run_aside, refuse_mixing
    from mogrpo.config import reconcile_resume
    from mogrpo.models import check_model_ref
    from mogrpo.runfolder import claim_output

    t0 = time.time()
    out = Path(output)
    # a bad backbone fails before OUTPUT is made
    check_model_ref(resolve_model_ref(cfg.backbone, cfg.cache_dir), "backbone")
    if overwrite and not resume:
        aside = move_run_aside(out, "reward train")
        if aside is not None:
            print(f"moved the earlier run in {out} to {aside}")
    lock = claim_output(out, "reward train")
    refuse_mixing(out, resume)
    try:
        if resume and (out / "config.yaml").is_file() and latest_checkpoint(out) is not None:
            cfg, notes = reconcile_resume(cfg, out / "config.yaml", RESUME_MAY_CHANGE)
            if notes:
                print("resume: the config differs from the run's config.yaml:\n  "
                      + "\n  ".join(notes))
        return _train(cfg, out, t0, resume=resume, show_progress=show_progress)
    finally:
        lock.release()


def _train(cfg: RewardTrainConfig, out: Path, t0: float, *, resume: bool,
           show_progress: bool) -> dict:
    """The loop, on the infrastructure every trainer shares: mogrpo/runtime.py (device,
    threads, seeds), mogrpo/tracking.py (metrics.jsonl, TensorBoard, W&B, progress) and
    mogrpo/checkpointing.py (one checkpoint per epoch, in the policy trainers' format)."""
    from transformers import get_linear_schedule_with_warmup

    from mogrpo.assets import resolve_model_ref
    from mogrpo.checkpointing import checkpoint_root, load_checkpoint, save_checkpoint, writing
    from mogrpo.reward.data import load_reward_data
    from mogrpo.runfolder import restore_rng, rng_state
    from mogrpo.runtime import Runtime, seed_everything
    from mogrpo.tracking import DivergedError, Tracker

    rt = Runtime(num_threads=cfg.num_threads, device=cfg.device)
    seed_everything(cfg.seed)
    device = rt.device

    data = load_reward_data(cfg)
    atomic_write_text(out / "data_stats.json", json.dumps(
        {"rows": {"train": len(data.train), "validation": len(data.validation),
                  "test": len(data.test)},
         "sources": data.stats}, indent=2, default=str))
    print(f"reward data: {len(data.train)} train, {len(data.validation)} validation, "
          f"{len(data.test)} test rows")

    model = MultiAspectRewardModel.from_backbone(
        resolve_model_ref(cfg.backbone, cfg.cache_dir), cfg.aspects, pooling=cfg.pooling,
        max_length=cfg.max_length, seed=cfg.seed, dropout=cfg.dropout)
    model.spec.backbone = cfg.backbone
    model.to(device)
    model.autocast_dtype = autocast_dtype(device, cfg.precision)
    # the loss's, not a reward's
    weights = torch.tensor([cfg.aspect_weights.get(a, 1.0) for a in cfg.aspects])

    lengths = [len(r.prompt) + len(r.response) for r in data.train]  # characters: a cheap proxy
    steps_per_epoch = len(length_grouped_batches(lengths, cfg.batch_size, cfg.seed))
    total_steps = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(_param_groups(model, cfg))
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total_steps), total_steps)

    root = checkpoint_root(out)
    start_epoch, best_loss, best_epoch, stale, best_state = 0, math.inf, -1, 0, None

    def restore(state: dict) -> None:
        model.load_state_dict(state["trainable"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])

    state = load_checkpoint(root, restore, warn=print) if resume else None
    if state is not None:
        alg = state["algorithm"]
        start_epoch, best_loss, best_epoch, stale = (alg["epoch"] + 1, alg["best_loss"],
                                                     alg["best_epoch"], alg["stale"])
        best_state = alg["best_state"]
        if alg.get("total_steps", total_steps) != total_steps:
            raise ValueError(f"epochs changed since the run started ({alg['total_steps']} steps "
                             f"then, {total_steps} now): the linear schedule's learning rate would "
                             f"jump; resume with the run's epochs, or start again (--overwrite)")
        restore_rng(state["rng"])
        print(f"resumed from {state['folder']} after epoch {start_epoch}")
        if stale >= cfg.patience:  # the run had stopped early: nothing more to train
            print(f"early stop: no validation improvement for {stale} epoch(s) before the resume")
            start_epoch = cfg.epochs
    elif resume:
        print(f"no checkpoint under {root}; starting from scratch")
    save_config(cfg, out / "config.yaml")  # after the data, the backbone and any checkpoint loaded

    tracker = Tracker(out, cfg, main=True)
    # the rows of the epochs after the checkpoint are written again
    tracker.start(start_epoch * steps_per_epoch if state is not None else None)
    step = start_epoch * steps_per_epoch
    n_trunc_train = 0
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch)
        bar = tracker.progress(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", show=show_progress,
                               unit="batch")
        running = []
        for idx in bar:
            rows = [data.train[i] for i in idx]
            batch, nt = model.encode([r.prompt for r in rows], [r.response for r in rows])
            n_trunc_train += nt
            batch = {k: v.to(device) for k, v in batch.items()}
            target = _labels(rows, cfg.aspects).to(device)  # [N, K], NaN = unlabelled
            pred = model(**batch)  # [N, K]
            loss, st = masked_regression_loss(pred, target, weights.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                         if cfg.grad_clip > 0 else torch.tensor(0.0))
            if not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))):  # before step
                raise DivergedError(f"step {step + 1}: loss = {loss.item()}, grad_norm = "
                                    f"{float(grad_norm)} is not finite; the last epoch's "
                                    f"checkpoint is intact: lower lr, then --resume")
            opt.step()
            sched.step()
            step += 1
            running.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}")
            rec = {"step": step, "epoch": epoch + 1, "loss": running[-1],
                   "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0]}
            for k, a in enumerate(cfg.aspects):
                v = float(st["per_aspect_mse"][k])
                if not math.isnan(v):
                    rec[f"train/{a}/mse"] = v
            tracker.log(rec)
        val_loss, vp, vt, _ = evaluate(model, data.validation, weights, cfg.eval_batch_size)
        val_metrics = aspect_metrics(vp, vt, cfg.aspects)
        tracker.log({"step": step, "epoch": epoch + 1, "validation/loss": val_loss,
                     "validation": val_metrics})
        summary = ", ".join(f"{a} r={m['pearson']:.3f}" for a, m in val_metrics.items()
                            if m["pearson"] is not None)
        print(f"epoch {epoch + 1}: train loss {np.mean(running):.4f}, "
              f"validation loss {val_loss:.4f} ({summary})")
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        save_checkpoint(root, {"step": step, "trainable": model.state_dict(),
                               "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "rng": rng_state(), "algorithm": {
                                   "epoch": epoch, "best_loss": best_loss, "best_epoch": best_epoch,
                                   "stale": stale, "total_steps": total_steps,
                                   "best_state": best_state}}, keep=KEEP_STATES)
        if stale >= cfg.patience:
            print(f"early stop: no validation improvement for {stale} epoch(s)")
            break
    tracker.close()
    rt.close()
    if best_state is not None:
        model.load_state_dict(best_state)

    test_loss, tp, tt, n_trunc_test = evaluate(model, data.test, weights, cfg.eval_batch_size)
    metrics = {
        "aspects": aspect_metrics(tp, tt, cfg.aspects),
        "test_loss": test_loss,
        "best_epoch": best_epoch + 1,
        "rows": {"train": len(data.train), "validation": len(data.validation),
                 "test": len(data.test)},
        "truncated": {"train_last_epoch_and_before": n_trunc_train, "test": n_trunc_test},
        "train_seconds": round(time.time() - t0, 1),
    }
    # Honesty check: the same metrics on human-labelled (not constructed) test rows only.
    human = np.array([not r.source.startswith("constructed/") for r in data.test], dtype=bool)
    if human.any() and not human.all():
        metrics["aspects_human_rows_only"] = aspect_metrics(tp[human], tt[human], cfg.aspects)
    metrics["sanity"] = run_sanity(model)
    # The policy's own outputs on held-out prompts (when the data has on-policy rows).
    if any(r.meta.get("construction") == "onpolicy" for r in data.test):
        metrics["on_policy"] = on_policy_validation(model, data.test, cfg.seed)
    with writing(out / "model"):
        model.save(out / "model")
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    if not cfg.keep_state:  # the model is saved: the optimiser/RNG state only served a resume
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return metrics
