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

The run itself (models, optimiser, checkpoints, resume, evaluation, logging) is the run
engine's (mogrpo/rl/engine.py). Under `accelerate launch`, pair sampling, scoring and the reference
log-probs are shared out over the processes chunk by chunk and gathered back in order, and
each step's batch of pairs is split over them, so the result equals the single-process run.
Shapes: P pairs, T tokens, L response tokens, K aspects.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm import tqdm

from mogrpo.config import atomic_write_text, field
from mogrpo.rl import trl_names
from mogrpo.rl.config import PolicyRunConfig
from mogrpo.rl.engine import Run
from mogrpo.rl.losses import dpo_loss
from mogrpo.runtime import all_sum


@dataclass
class DPOConfig(PolicyRunConfig):
    """Config of `mogrpo train dpo` (YAML keys = field names; shared keys in PolicyRunConfig;
    TRL's DPO names with their meaning, docs/trl.md)."""

    REFUSED: ClassVar[dict] = {**{k: v for k, v in PolicyRunConfig.REFUSED.items()
                                  if k != "num_train_epochs"}, **trl_names.REFUSED_DPO}

    pairs: str | None = field(None,
                              help="own preference data: JSONL with prompt/chosen/rejected, or "
                                         "'hf:pku-saferlhf:<hub id or file>'; default: sample and "
                                         "score")
    pair_prompts: int = field(240, help="training prompts to sample pairs for (match GRPO: steps x "
                                        "prompts per step = 60 x 4)")
    min_margin: float = field(0.05, help="skip pairs whose combined-score margin is at most this")
    generation_chunk: int = field(4, help="prompts per generate call while sampling pairs")
    beta: float = field(0.1, help="DPO beta (strength of the implicit KL)")
    loss_type: str = field("sigmoid", help="sigmoid (DPO) | ipo")
    epochs: int = field(2, help="passes over the pairs")
    batch_size: int = field(8, help="pairs per optimiser step")
    lr: float = field(5e-5, help="AdamW learning rate")
    weight_decay: float = field(0.01, help="AdamW weight decay")
    lr_schedule: str = field("linear", help="constant_with_warmup | linear | cosine")

    @classmethod
    def translate_names(cls, data: dict) -> dict:
        """TRL's DPO names: num_train_epochs (whole), a one-loss loss_type list, pairs per
        device (rl/trl_names.py), then the shared names."""
        trl_names.epochs(cls, data)
        trl_names.translate_loss_type(cls, data)
        trl_names.per_device_batch(cls, data, micro=None)
        data.pop("_accumulation", None)
        return super().translate_names(data)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError("group_size (samples per prompt) must be >= 2 to pick a best and a "
                             "worst response")
        self.check()
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        for name in ("epochs", "batch_size", "pair_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_new_tokens: int,
                 max_prompt_length: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[P, T] input ids and attention mask (prompt left-padded, response right-padded) and the
    response mask [P, L]; the layout `completion_logprobs` expects. Responses end with EOS.
    `max_prompt_length`: each prompt keeps its last N tokens (as the rollouts do)."""
    from mogrpo.rollout import chat_texts

    p = tokenizer(chat_texts(tokenizer, prompts), add_special_tokens=False)["input_ids"]
    p = [x[-max_prompt_length:] for x in p] if max_prompt_length else p
    r = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    r = [(ids[:max_new_tokens - 1] + [eos]) for ids in r]
    P, L = max(len(x) for x in p), max(len(x) for x in r)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (P - len(a)) + a + b + [pad] * (L - len(b)) for a, b in zip(p, r)])
    attn = torch.tensor([[0] * (P - len(a)) + [1] * (len(a) + len(b)) + [0] * (L - len(b)) for a,
                         b in zip(p, r)])
    rmask = torch.tensor([[1] * len(b) + [0] * (L - len(b)) for b in r])
    return ids, attn, rmask


def sequence_logprob(token_logprobs, tokenizer, prompts, responses, max_new_tokens, device,
                     max_prompt_length: int | None = None):
    """Summed log-prob [P] of each response given its prompt, and its token count [P].
    `token_logprobs(ids, attn, L)` gives the token log-probs [P, L] (the policy's, with
    gradients, or the reference's)."""
    ids, attn, rmask = encode_pairs(tokenizer, prompts, responses, max_new_tokens,
                                    max_prompt_length)
    rmask = rmask.to(device)
    logp = token_logprobs(ids.to(device), attn.to(device), rmask.shape[1])
    return (logp * rmask).sum(-1), rmask.sum(-1)


def load_pairs_file(spec: str) -> list[dict]:
    from mogrpo.data.loaders import iter_jsonl
    from mogrpo.data.schema import DataError

    if spec.startswith("hf:"):
        from mogrpo.data.hf import load_hf_pairs

        _, adapter, source = spec.split(":", 2)
        if adapter != "pku-saferlhf":
            raise DataError(f"pairs {spec!r}: only hf:pku-saferlhf:<id or file> has preference "
                            f"pairs")
        return list(load_hf_pairs(source))
    out = []
    for where, row in iter_jsonl(spec):
        conversation = isinstance(row, dict) and isinstance(row.get("prompt"), list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in row["prompt"])
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str)
                                                for k in ("chosen", "rejected")) or not (
                isinstance(row.get("prompt"), str) or conversation):
            raise DataError(f"{where}: a pair needs string fields 'chosen' and 'rejected', and "
                            f"'prompt' as a string or a list of {{role, content}} messages")
        out.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
    return out


DPO_STATS = ("loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")


def sample_pairs(run: Run, show_progress: bool) -> list[dict]:
    """Best/worst pairs from G samples of the reference policy per training prompt, scored by
    the reward model and combined with the weights. Chunks of prompts go round-robin to the
    processes, each seeded by its first prompt's index as with one process, and the pairs
    are gathered back in order, so they do not depend on the number of processes."""
    from accelerate.utils import gather_object

    from mogrpo.data.prompts import step_prompt_indices
    from mogrpo.rl.pairs import best_worst_pairs

    cfg, G = run.cfg, run.cfg.group_size
    prompts = run.train_prompts
    pool = [prompts[i] for i in step_prompt_indices([p.kind for p in prompts], cfg.pair_prompts, 0,
                                                    cfg.seed,
                                                    cfg.balance_kinds)]
    found_here, skipped, n_tokens = [], 0, 0  # (index in pool, pair) of this process's chunks
    starts = list(range(0, len(pool), cfg.generation_chunk))[run.rank::run.world]
    for start in tqdm(starts, desc="dpo pairs", disable=not (show_progress and run.main)):
        ref_net, ref_ctx = run.reference_net()
        with ref_ctx:
            ro = run.rollout(0, model=ref_net, prompts=pool[start:start + cfg.generation_chunk],
                             first_index=start,
                             count=False)
        n_tokens += int(ro.completion_mask.sum())
        combined = run.objective.combine(run.score(ro))  # [b, G]
        found, sk = best_worst_pairs(combined, cfg.min_margin)
        skipped += sk
        # the prompt as asked: a conversation stays whole for the chat template
        found_here += [(start + b, {"prompt": ro.chats[b], "kind": ro.kinds[b],
                                    "chosen": ro.completions[b * G + i],
                                    "rejected": ro.completions[b * G + j],
                                    "margin": float(combined[b, i] - combined[b, j])}) for b, i,
                                    j in found]
    counts = all_sum(run.acc)(torch.tensor([skipped, n_tokens], device=run.device))
    run.count_tokens(int(counts[1]))
    # one-process order
    pairs = [p for _, p in sorted(gather_object(found_here), key=lambda x: x[0])]
    if run.main:
        print(f"dpo: {len(pairs)} pairs from {len(pool)} prompts ({int(counts[0])} skipped: "
              f"margin <= "
              f"{cfg.min_margin} or too few scored samples)")
    return pairs


def train_dpo(cfg: DPOConfig, output: str | os.PathLike, *, resume: bool = False,
              show_progress: bool = True, **objects) -> dict:
    """Pairs and reference log-probs are computed once (shared out over the processes and
    gathered in order); each optimiser step's batch of pairs is split over the processes,
    each local mean loss weighted by its share (x processes, as DDP averages), so the
    update is the single-process one. `objects` (reward_sources, files, callbacks) go to the
    run (rl/engine.Run), as the trainer API passes them."""
    from accelerate.utils import gather_object

    run = Run(cfg, output, name="dpo", resume=resume, show_progress=show_progress, **objects)
    acc, tok, L_max = run.acc, run.tok, cfg.max_new_tokens

    # ---- pairs (sampled from the reference and scored, or the user's), cached in the run folder
    pairs_path = run.out / "pairs.jsonl"
    if resume and pairs_path.is_file():
        pairs = [json.loads(x) for x in pairs_path.read_text().splitlines()]
    else:
        pairs = load_pairs_file(cfg.pairs) if cfg.pairs else sample_pairs(run, show_progress)
    if not pairs:
        raise ValueError("no preference pairs: lower min_margin or sample more responses per "
                         "prompt")
    acc.wait_for_everyone()  # every process has decided where its pairs come from
    if run.main:
        atomic_write_text(pairs_path, "".join(json.dumps(p,
                                                         ensure_ascii=False) + "\n" for p in pairs))

    # ---- reference log-probs [P] of chosen and rejected, once: chunks of batch_size round-robin
    def ref_lp(ids, attn, L):
        return run.ref_logprobs(ids, attn, L, temperature=1.0)

    mine = []
    for c in range(run.rank, (len(pairs) + cfg.batch_size - 1) // cfg.batch_size, run.world):
        chunk = pairs[c * cfg.batch_size:(c + 1) * cfg.batch_size]
        mine.append((c, *(sequence_logprob(ref_lp, tok, [p["prompt"] for p in chunk],
                                           [p[key] for p in chunk],
                                           L_max, run.device,
                                           cfg.max_prompt_length)[0].cpu() for key in ("chosen",
                                                                                   "rejected"))))
    parts = sorted(gather_object(mine), key=lambda x: x[0])
    ref_c, ref_r = torch.cat([x[1] for x in parts]), torch.cat([x[2] for x in parts])

    steps_per_epoch = (len(pairs) + cfg.batch_size - 1) // cfg.batch_size
    run.setup_optimizer(steps_per_epoch * cfg.epochs)

    def policy_lp(ids, attn, L):
        from mogrpo.rollout import completion_logprobs

        with run.amp_ctx():
            return completion_logprobs(run.model, ids, attn, L, shared_prefix=cfg.shared_prefix)[0]

    def step(t: int) -> dict:
        epoch, k = divmod(t, steps_per_epoch)
        order = list(range(len(pairs)))
        random.Random(cfg.seed * 7919 + epoch).shuffle(order)
        batch = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]  # the global batch of pairs
        # Local mean loss x world x (local pairs / batch pairs): DDP's average is the batch mean.
        # A process with no pair of this (short, last) batch runs one with weight 0, so that
        # the gradient all-reduce has every process.
        idx = batch[run.rank::run.world]
        weight = run.world * len(idx) / len(batch)
        idx = idx or batch[:1]
        chunk = [pairs[i] for i in idx]
        ps = [p["prompt"] for p in chunk]
        with run.timer("policy_forward_backward"):
            pc, lc = sequence_logprob(policy_lp, tok, ps, [p["chosen"] for p in chunk], L_max,
                                      run.device, cfg.max_prompt_length)
            pr, lr_ = sequence_logprob(policy_lp, tok, ps, [p["rejected"] for p in chunk], L_max,
                                       run.device, cfg.max_prompt_length)
            loss, st = dpo_loss(pc.float(), pr.float(), ref_c[idx].to(pc.device),
                                ref_r[idx].to(pc.device),
                                beta=cfg.beta, loss_type=cfg.loss_type,
                                chosen_len=lc.float(), rejected_len=lr_.float())
            run.opt.zero_grad(set_to_none=True)
            acc.backward(loss * weight)
            grad_norm = run.optimizer_step()[0]  # after backward: the global norm
        st = all_sum(acc)(torch.stack([st[key].double() * weight / run.world for key in DPO_STATS] +
                                      # one transfer per step
                                      [grad_norm.double().to(run.device)])).tolist()
        return {"epoch": epoch + 1, **dict(zip(DPO_STATS, st[:-1])),
                "grad_norm": st[-1] / run.world}

    return run.train(steps_per_epoch * cfg.epochs, step, postfix=("loss", "reward_accuracy"),
                     pairs=len(pairs))
