"""What a rollout step does around the update, for every rollout algorithm: sampling this
process's prompts, which guided openers train, the independent judges' refusal rates logged
every step, and sample completions to samples.jsonl. Shapes: B prompts, G samples per prompt,
N = B*G sequences, L completion tokens, K reward columns."""

from __future__ import annotations

import torch

from mogrpo.runtime import all_sum, full_weights

JUDGE_KEYS = ("judge/refusal_harmful", "judge/over_refusal_benign", "judge/guided_refusal_harmful",
              "judge/guided_refusal_benign")


def rollout(run, step: int, *, model=None, prompts=None, first_index: int = 0):
    """This process's share of step `step`'s prompts, G samples each (guided ones as the
    config says), from `model` or else the policy (its merged generation copy when there is
    one). `prompts` + `first_index` replace the step's own."""
    from mogrpo.data.prompts import step_prompt_indices
    from mogrpo.reward.scoring import record_columns
    from mogrpo.rollout import REFUSAL_OPENERS, generate_rollout

    cfg = run.cfg
    if prompts is None:
        B_local = run.prompts_per_process()
        pool = run.train_prompts
        batch = [pool[i] for i in step_prompt_indices([p.kind for p in pool], B_local * run.world,
                                                      step,
                                                      cfg.seed, cfg.balance_kinds)]
        prompts, first_index = (batch[run.rank * B_local:(run.rank + 1) * B_local],
                                run.rank * B_local)
    with run.timer("generation"), run.amp_ctx(), full_weights(model if model is not None
                                                              else run.policy, run.acc):
        gen = model if model is not None else (run.merged.sync() if run.merged else run.policy)
        ro = generate_rollout(gen, run.tok, [p.chat for p in prompts], [p.kind for p in prompts],
                              group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                              step=step, first_index=first_index,
                              chunk_prompts=cfg.generation_chunk or None, guided=run.guided_samples,
                              openers=tuple(cfg.guide_openers or REFUSAL_OPENERS),
                              engine=run.rollout_engine, max_prompt_length=cfg.max_prompt_length)
    ro.requests = [p.judged_request for p in prompts]
    ro.chats = [p.chat for p in prompts]  # [B] as asked: for chat-template rewards, functions
    ro.columns = record_columns(prompts)  # {name: [B]}: the rows' columns, for functions
    return ro


def sampler_setup(cfg, sharding: str | None, model, amp):
    """(rollout engine, merged generation copy or None): mogrpo's engine where it applies
    (`auto`), `generate` under sharding (the engine reads whole weights; sharded runs gather
    them for generate). mogrpo's engine merges LoRA into its own transient snapshot; generate
    samples from a merged copy (models.MergedGenerationCopy) unless merged_generation=false."""
    from mogrpo.generation import unsupported
    from mogrpo.models import MergedGenerationCopy, is_peft

    engine = cfg.rollout_engine
    if sharding is not None:
        if engine == "mogrpo":
            raise ValueError(f"rollout_engine=mogrpo does not run under {sharding}: use auto or "
                             f"generate")
        engine = "generate"
    elif engine == "auto":
        engine = "mogrpo" if unsupported(model) is None else "generate"
    if sharding == "fsdp" and is_peft(model) and not cfg.merged_generation:
        raise ValueError("merged_generation=false under FSDP2: generate cannot sample from the "
                         "sharded LoRA policy (FSDP requires a single root module); keep "
                         "merged_generation=true (the default)")
    merged = MergedGenerationCopy(model, amp) if (
        cfg.merged_generation and is_peft(model) and engine == "generate") else None
    return engine, merged


class LazyLabeller:
    """The refusal labeller (mogrpo/reward/labeller.py; the one the reward data was labelled
    with, never the evaluation's pattern judge), fitted on first use: call it."""

    def __init__(self, cache_dir: str | None):
        self.cache_dir, self.labeller = cache_dir, None

    def __call__(self):
        if self.labeller is None:
            from mogrpo.reward.labeller import RefusalLabeller

            self.labeller = RefusalLabeller.default(self.cache_dir)
        return self.labeller


def credit_openers(cfg, ro, labeller, timer, adv: torch.Tensor | None = None) -> dict:
    """Set `ro.loss_mask` by cfg.opener_credit, which guided samples train their forced opener
    tokens (a guided sample's continuation always trains):
    - 'signed' (needs `adv` [N], one advantage per sample): those whose advantage pushes the
      opener the way the prompt's kind warrants, up on harmful prompts and down on benign
      ones (rollout.signed_opener_credit; docs/theory.md section 8);
    - 'refusals': those the labeller judges a refusal as a whole (P >= 0.5), so an opener is
      not pushed by an outcome it did not decide (section 7);
    - 'all': every one.
    `labeller()` gives the refusal labeller. Returns the share of guided samples credited per
    prompt kind (logs)."""
    from mogrpo.rollout import opener_loss_mask, signed_opener_credit

    mode = cfg.opener_credit
    if ro.guided is None or not bool(ro.guided.any()) or mode == "all":
        return {}
    idx = ro.guided.nonzero().flatten().tolist()
    if mode == "signed":
        if adv is None:
            raise ValueError("opener_credit 'signed' needs the advantages: call "
                             "credit_openers(ro, adv)")
        kinds = [ro.kinds[i // ro.group_size] for i in range(len(ro.completions))]
        credit = signed_opener_credit(adv.reshape(-1), kinds)
    else:
        with timer("opener_credit"):
            p = labeller().refusal_prob([ro.completions[i] for i in idx])
        credit = torch.zeros(len(ro.completions), dtype=torch.bool)
        credit[idx] = torch.as_tensor(p >= 0.5)
    ro.loss_mask = opener_loss_mask(ro.completion_mask, ro.opener_len, credit)
    out = {}
    for kind in ("harmful", "benign"):
        rows = [i for i in idx if ro.kinds[i // ro.group_size] == kind]
        out[f"opener_credited/{kind}"] = float(credit[rows].float().mean()) if rows else None
    return out


def judge_rates(acc, ro) -> dict:
    """Independent judges on a rollout, logged every step as zero-weight columns (they never
    enter the advantage): the pattern refusal judge's refusal rate on the harmful prompts' own
    (unguided) samples, its over-refusal rate on the benign prompts' own samples, and the
    refusal rates of guided samples. Counts are summed over processes; None = no such sample."""
    from mogrpo.eval.metrics import is_refusal

    G = ro.group_size
    guided = ro.guided.tolist() if ro.guided is not None else [False] * len(ro.completions)
    counts = torch.zeros(len(JUDGE_KEYS), 2, dtype=torch.float64)  # [keys, (refusals, samples)]
    for i, text in enumerate(ro.completions):
        kind = ro.kinds[i // G]
        if kind not in ("harmful", "benign"):
            continue
        k = (0 if kind == "harmful" else 1) + (2 if guided[i] else 0)
        counts[k, 0] += float(is_refusal(text))
        counts[k, 1] += 1
    counts = all_sum(acc)(counts.to(acc.device)).cpu()
    return {key: (float(c[0] / c[1]) if c[1] else None) for key, c in zip(JUDGE_KEYS, counts)}


def rollout_record(run, ro, rewards: torch.Tensor) -> dict:
    """What every rollout-based step logs: reward means/stds per column and combined (global),
    completion length and finished share, and the independent judges' refusal rates."""
    acc = run.acc
    all_rewards = acc.gather(rewards.to(run.device)).cpu()  # [B, G, K]
    lengths = acc.gather(ro.completion_mask.sum(1).float().to(run.device))
    finished = acc.gather(ro.finished.float().to(run.device))
    return {**run.objective.record(all_rewards), "completion_length": float(lengths.mean()),
            "finished_fraction": float(finished.mean()), **judge_rates(acc, ro)}


def log_samples(run, step: int, ro, rewards: torch.Tensor) -> None:
    """Every cfg.sample_every steps: every sample of this rollout with its rewards to
    samples.jsonl, one per group to TensorBoard (main process)."""
    every = run.cfg.sample_every
    if not (run.main and every and step % every == 0):
        return
    G, cols = ro.group_size, list(run.objective.columns)
    run.tracker.text("samples",
                     "\n\n".join(f"[{ro.kinds[i // G]}] {ro.prompts[i // G]}\n-> "
                                 f"{ro.completions[i]}"
                                            for i in range(0, len(ro.completions), G)), step)
    flat = rewards.reshape(-1, len(cols))
    run.tracker.append("samples.jsonl", {"step": step, "samples": [
        {"prompt": ro.prompts[i // G], "completion": ro.completions[i],
         "rewards": dict(zip(cols, flat[i].tolist()))}
        for i in range(len(ro.completions))]})
