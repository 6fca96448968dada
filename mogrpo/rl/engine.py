"""The run every policy algorithm shares (GRPO, PPO, DPO, RLOO).

`Run` composes the run infrastructure (mogrpo/runtime.py: accelerator, device, threads, seeds,
sharded state; mogrpo/tracking.py: metrics, TensorBoard, W&B, timing; mogrpo/checkpointing.py:
the checkpoint format, resume, the best checkpoint) with what a policy run needs: the reward
objective and its scorer, the policy (+ LoRA) and its reference, prompts, rollouts
(mogrpo/rl/samples.py), the optimiser and LR schedule, the update (mogrpo/rl/update.py),
evaluation before and after and validation (the one evaluator, mogrpo/eval/harness.py;
mogrpo/rl/selection.py's criterion picks the step final/ holds), and the files a finished run
leaves. An algorithm builds a `Run`, says how many steps it makes and what one step does
(`Run.train(steps, step_fn)`); its file then reads as its idea alone.

Multi-process (`accelerate launch`): each process samples its share of a step's prompts,
whole groups, so group statistics are local and exact; whatever an algorithm needs over the
global batch it reduces with `all_sum` / `acc.gather`. Shapes: B prompts, G samples per
prompt, N = B*G sequences, L completion tokens, K reward columns.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from mogrpo.checkpointing import Selection, load_best, refuse_mixing, trainable_state
from mogrpo.config import save_config
from mogrpo.rl import run_state, samples, update
from mogrpo.rl.config import PolicyRunConfig
from mogrpo.rl.selection import CRITERION, select_step
from mogrpo.runfolder import claim_output
from mogrpo.runtime import (
    NO_DEEPSPEED_CHECKPOINTS,
    Runtime,
    full_weights,
    norm_tensor,
    seed_everything,
)
from mogrpo.tracking import PhaseTimer, Tracker, peak_memory_mb

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # PolicyRunConfig.policy_dtype


def load_run_policy(cfg: PolicyRunConfig, device, amp, need_reference: bool):
    """(policy (+ LoRA) on `device`, tokenizer, frozen reference copy or None): the reference
    of a LoRA run is the policy with its adapters off, so only full fine-tuning keeps a copy."""
    from mogrpo.models import cast_frozen_linears, frozen_copy, is_peft, load_policy

    torch.manual_seed(cfg.seed)  # LoRA's initial A matrices depend on it
    model, tok = load_policy(cfg.policy, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                             lora_dropout=cfg.lora_dropout,
                             lora_target_modules=cfg.lora_target_modules, cache=cfg.cache_dir,
                             dtype=DTYPES[cfg.policy_dtype])
    model.to(device)
    if DTYPES[cfg.policy_dtype] != torch.float32 and amp is None:
        raise ValueError(f"policy_dtype={cfg.policy_dtype} needs bf16 compute, which precision="
                         f"{cfg.precision} does not give on {device}: set precision=bf16 or "
                         f"policy_dtype=fp32")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # generation turns the cache back on per call
    ref = None if (is_peft(model) or not need_reference) else frozen_copy(model).to(device)
    for m in (model, ref):  # frozen backbone weights in the autocast dtype (no per-call casts)
        if m is not None:
            cast_frozen_linears(m, amp)
    return model, tok, ref


def run_objective(cfg: PolicyRunConfig, sources: list | None, extra: dict | None, device, amp):
    """(Scorer, RewardObjective) of a run: the sources given in Python (config.yaml then
    records their specs) or built from the config's `rewards`, plus the extra columns; the
    weights and masks resolved over the columns (reward/objective.resolve_run_objective)."""
    from mogrpo.reward.objective import RewardObjective, resolve_run_objective
    from mogrpo.reward.scoring import Scorer
    from mogrpo.reward.sources import build_sources, place_sources

    if sources is None:
        sources = build_sources(cfg.reward_specs(), cache_dir=cfg.cache_dir, device=device)
    else:  # given in Python: config.yaml says what scored
        cfg.rewards = [src.spec() for src in sources]
    scorer = Scorer(place_sources(sources, device, amp), extra or {},
                    repetition_penalty=cfg.repetition_penalty)
    weights, scorer.not_applicable = resolve_run_objective(scorer.columns, cfg)
    # no source at all (DPO on given pairs): nothing to train on, the evaluations score nothing
    return scorer, RewardObjective.build(scorer.columns, weights, scorer.not_applicable,
                                         training=bool(scorer.columns))


def guided_count(cfg: PolicyRunConfig) -> int:
    """Guided samples per group: the config's, else 1 on the default (safety) training prompts
    and 0 on a user's own: refusal openers belong to the safety task."""
    if cfg.guided_samples is not None:
        return cfg.guided_samples
    return min(1, cfg.group_size - 1) if cfg.train_prompts == "default" else 0


def write_given_files(cfg: PolicyRunConfig, out: Path, files: dict, *, main: bool,
                      wait: Callable[[], None]) -> None:
    """Rows given in Python (the trainer API's datasets) written into the run folder as
    KEY.jsonl, and cfg.KEY pointed at them (every process; the main one writes)."""
    from mogrpo.data.loaders import write_jsonl

    for key, rows in files.items():
        path = out / f"{key}.jsonl"
        if main:
            write_jsonl(path, rows)
        setattr(cfg, key, str(path))
    if files:
        wait()


def load_run_prompts(cfg: PolicyRunConfig, name: str) -> list:
    """The evaluation or validation prompts of a run (balanced by kind, at most the config's
    count); validation needs both kinds."""
    from mogrpo.data.prompts import balanced_subset, load_prompt_set

    source, limit = ((cfg.eval_prompts, cfg.eval_max_prompts) if name == "eval"
                     else (cfg.validation_prompts, cfg.validation_max_prompts))
    if source == "none":
        return []
    records = balanced_subset(load_prompt_set(source, cfg.cache_dir, name), limit, cfg.seed)
    missing = sorted({"harmful", "benign"} - {p.kind for p in records})
    if name == "validation" and missing:
        raise ValueError(f"validation_prompts {source!r} has no {' or '.join(missing)} prompts: "
                         f"selection weighs "
                         f"harmful compliance against benign over-refusal, so give both kinds (or "
                         f"validation_prompts=none)")
    return records


def check_sharded_run(kind: str | None, cfg: PolicyRunConfig, validating: bool,
                      has_ref: bool) -> None:
    """What mogrpo does not do under DeepSpeed, refused before any step."""
    if kind != "deepspeed":
        return
    if cfg.save_every:
        raise ValueError(NO_DEEPSPEED_CHECKPOINTS)
    if validating:
        raise ValueError("checkpoint selection saves and reloads the best weights, which mogrpo "
                         "does not do "
                         "under DeepSpeed: set validation_prompts=none (final/ is then the last "
                         "step), or "
                         "shard with FSDP (configs/accelerate/fsdp.yaml)")
    if has_ref:
        raise ValueError("full fine-tuning (lora_r=0) keeps a separate reference model, which "
                         "mogrpo does not "
                         "shard under DeepSpeed: use LoRA (lora_r>0; the reference is the "
                         "adapter-off policy) "
                         "or FSDP (configs/accelerate/fsdp.yaml)")


def best_weights(run) -> dict | None:
    """The policy's trainable tensors for best/ on the main process (None elsewhere); gathered
    first when sharded, a collective every process calls."""
    full = run.runtime.gathered_state(run.model)
    return trainable_state(run.policy, full) if run.main else None


def selection_rule(cfg: PolicyRunConfig):
    """history -> (selected step, reason): rl/selection.py's criterion, the base (step 0)
    setting its limits."""
    return lambda h: select_step(h, h[0], cfg.select_max_over_refusal,
                                 cfg.select_max_degenerate_rise)


class Run:
    """One training run of any policy algorithm: see the module docstring. Attributes an
    algorithm uses: cfg, runtime (acc, world, rank, main, device), out, amp, objective, scorer,
    model (the trained module, prepared by `setup_optimizer`), policy (unwrapped), tok,
    trainable (parameters), timer, opt, sched."""

    def __init__(self, cfg: PolicyRunConfig, output: str | os.PathLike, *, name: str,
                 resume: bool = False,
                 show_progress: bool = True, check_world: Callable[[int], None] | None = None,
                 extra_rewards: dict | None = None, need_reference: bool = True,
                 reward_sources: list | None = None, files: dict | None = None,
                 callbacks: list | None = None):
        """`reward_sources` (reward/sources.py objects) replace the config's `rewards`;
        `files` ({config key: rows}, e.g. {"train_prompts": [...], "pairs": [...]}) are
        written into the run folder as KEY.jsonl and the key pointed at them, so the run
        folder holds the data it was trained and evaluated on; `callbacks` receive each
        step's metrics (tracking.Tracker)."""
        from mogrpo.models import autocast_dtype

        self.t_start = time.time()
        self.cfg, self.name, self.resume, self.show_progress = cfg, name, resume, show_progress
        self.out = Path(output)
        self.runtime = rt = Runtime(num_threads=cfg.num_threads, check_world=check_world)
        self.acc, self.world, self.rank, self.main, self.device = (rt.acc, rt.world, rt.rank,
                                                                   rt.main, rt.device)
        if self.main:  # refuses a file, an unwritable path, a folder mogrpo did not make or in use,
            self.lock = claim_output(self.out, f"train {name}")
            refuse_mixing(self.out, resume)  # and a fresh run into a folder holding another run
        write_given_files(cfg, self.out, files or {}, main=self.main, wait=rt.wait)
        seed_everything(cfg.seed)
        self.amp = autocast_dtype(self.device, cfg.precision)
        self.policy_dtype = DTYPES[cfg.policy_dtype]
        self.scorer, self.objective = run_objective(cfg, reward_sources, extra_rewards,
                                                    self.device, self.amp)
        model, self.tok, self.ref_model = load_run_policy(cfg, self.device, self.amp,
                                                          need_reference)
        self.model = self.policy = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.rollout_engine, self.merged = samples.sampler_setup(cfg, rt.sharding, model, self.amp)
        self.eval_prompts = load_run_prompts(cfg, "eval")
        self.validation_prompts = load_run_prompts(cfg, "validation")
        self.guided_samples = guided_count(cfg)
        self.refusal_labeller = samples.LazyLabeller(cfg.cache_dir)  # fitted on first use
        if cfg.train_prompts != "default":  # a user's file is read now: a bad one fails early
            self.train_prompts  # noqa: B018
        self.timer, self.tokens_generated, self.opt, self.sched = PhaseTimer(), 0, None, None
        self.modules: list = []  # modules prepared besides the policy (PPO's critic)
        check_sharded_run(rt.sharding, cfg, bool(self.validation_prompts),
                          self.ref_model is not None)
        self.tracker = Tracker(self.out, cfg, main=self.main, per_step=("samples.jsonl",),
                               callbacks=callbacks)
        self.selection = Selection(self.out, selection_rule(cfg), main=self.main, wait=rt.wait)
        # only now: every input has been read, so a config.yaml never describes a failed start
        if self.main:
            save_config(cfg, self.out / "config.yaml")

    # ---- pieces an algorithm calls

    def amp_ctx(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()

    @functools.cached_property
    def train_prompts(self):
        """The training prompts, read on first use (DPO with its own pairs never needs them)."""
        from mogrpo.data.prompts import load_prompt_set

        return load_prompt_set(self.cfg.train_prompts, self.cfg.cache_dir, "train")

    def setup_optimizer(self, total_updates: int, groups: list[dict] | None = None,
                        modules: tuple = ()):
        """update.setup_optimizer: AdamW and the LR schedule over `total_updates` optimiser
        steps; the policy and `modules` (e.g. PPO's critic) prepared. Returns those modules."""
        return update.setup_optimizer(self, total_updates, groups, modules)

    def prompts_per_process(self) -> int:
        """B_local: prompts each process samples per step (whole groups; checked at start)."""
        return self.cfg.batch_size // (self.cfg.group_size * self.world)

    def rollout(self, step: int, *, model=None, prompts=None, first_index: int = 0,
                count: bool = True):
        """samples.rollout; `count` adds the generated tokens of every process to the run's
        total (a collective: every process must call it)."""
        ro = samples.rollout(self, step, model=model, prompts=prompts, first_index=first_index)
        if count:
            self.count_tokens(int(self.runtime.all_sum(ro.completion_mask.sum().to(self.device))))
        return ro

    def count_tokens(self, n: int) -> None:
        """Add `n` generated tokens (already summed over the processes) to the run's cost."""
        self.tokens_generated += n

    def credit_openers(self, ro, adv: torch.Tensor | None = None) -> dict:
        """samples.credit_openers with this run's config and refusal labeller."""
        return samples.credit_openers(self.cfg, ro, self.refusal_labeller, self.timer, adv)

    def score(self, ro) -> torch.Tensor:
        """Rewards [B_local, G, K] of a rollout (NaN = not applicable). An attack prompt's answer
        is judged against the request inside the template: the reward model reads 256 tokens,
        and a template would push the request out of them."""
        with self.timer("scoring"):
            return self.scorer.score(ro.judged_requests, ro.kinds, ro.completions, ro.group_size,
                                     chats=ro.chats, columns=ro.columns)

    def logprobs(self, model, ids, attn, L: int, chunk: int = 0,
                 temperature: float | None = None) -> torch.Tensor:
        return update.logprobs(self, model, ids, attn, L, chunk, temperature)

    def ref_logprobs(self, ids, attn, L: int, chunk: int = 0,
                     temperature: float | None = None) -> torch.Tensor:
        """The reference policy's token log-probs [N, L] (no gradients): the same model with
        the LoRA adapters off, or the frozen copy. The one way every algorithm gets them."""
        net, ctx = self.reference_net()
        with self.timer("reference"), ctx:
            return update.logprobs(self, net, ids, attn, L, chunk, temperature)

    def reference_net(self):
        """(model, context) to run the reference policy with, e.g. for sampling from it."""
        if self.ref_model is None:
            return self.policy, self.policy.disable_adapter()
        return self.ref_model, nullcontext()

    def optimizer_step(self, *param_sets) -> list[torch.Tensor]:
        """Clip each parameter set's (all-reduced) gradients to cfg.grad_clip on its own (0 =
        only measure), step the optimiser and the schedule; returns the pre-clip norms (0-dim
        tensors on the device: read them once per step, not per optimiser step)."""
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norms = [norm_tensor(self.acc.clip_grad_norm_(ps, clip), self.device)
                 for ps in (param_sets or (self.trainable,))]
        self.opt.step()
        self.sched.step()
        return norms

    def policy_update(self, ro, adv: torch.Tensor, **kw) -> dict:
        return update.policy_update(self, ro, adv, **kw)

    def rollout_record(self, ro, rewards: torch.Tensor) -> dict:
        return samples.rollout_record(self, ro, rewards)

    def log_samples(self, step: int, ro, rewards: torch.Tensor) -> None:
        samples.log_samples(self, step, ro, rewards)

    def evaluate(self, records, out_file: Path, phase: str) -> dict:
        """The one evaluator (greedy, training RM + judges) on `records` with the policy as it
        is."""
        from mogrpo.eval.harness import evaluate_loaded

        if not records:
            return {}
        with self.timer(phase), self.amp_ctx(), full_weights(self.policy, self.acc):
            model = self.merged.sync() if self.merged else self.policy
            return evaluate_loaded(model, self.tok, records,
                                   rm=self.scorer if self.scorer.columns else None,
                                   objective=self.objective,
                                   max_new_tokens=self.cfg.eval_max_new_tokens,
                                   amp_ctx=self.amp_ctx, acc=self.acc, engine=self.rollout_engine,
                                   out_file=out_file, max_prompt_length=self.cfg.max_prompt_length)

    def select(self, step: int) -> dict:
        """Validate the policy after `step` steps (0 = the base) and apply the fixed criterion
        (checkpointing.Selection). Collective. Returns the metrics to log at this step."""
        s = self.evaluate(self.validation_prompts,
                          self.out / "validation" / f"step-{step:06d}_generations.jsonl",
                          "validation")
        rec = {"step": step, "compliance": s["harmful"]["compliance_rate"],
               "over_refusal": s["benign"]["over_refusal_rate"], "degenerate": s["degenerate_rate"]}
        return self.selection.add(rec, lambda: best_weights(self))

    # ---- the loop

    def train(self, steps: int, step_fn: Callable[[int], dict], *, state: Callable[[], dict] = dict,
              load_state: Callable[[dict], None] = lambda s: None, postfix: tuple[str, ...] = (),
              **cost_extra) -> dict:
        """Resume (if asked and a checkpoint exists), evaluate before, validate the base (step
        0), then for each step: rec = step_fn(step) -> validate every cfg.validate_every steps
        and at the last step (select) -> log (+ lr, timing, memory) -> checkpoint every
        cfg.save_every steps; then load the selected step's weights (best/), evaluate after and
        write final/ (= the selected step), eval_before.json, eval_after.json, cost.json. With
        validation_prompts=none nothing is validated and final/ is the last step. `state()` is
        the algorithm's own checkpointed state, `load_state(s)` restores it. Returns
        {eval_before, eval_after} (+ selected_step when selecting, + cost on the main process)."""
        cfg, rt = self.cfg, self.runtime
        start, eval_before, selecting = 0, None, bool(self.validation_prompts)
        saved = run_state.resume_run(self, load_state) if self.resume else None
        if saved is not None:
            start, eval_before = saved["step"], saved["eval_before"]
            if selecting and "selection" not in saved:
                selecting = False
                if self.main:
                    print(f"warning: {saved['folder']} holds no validation history (written "
                          f"before checkpoint "
                          f"selection); this run selects nothing: final/ is the last step",
                          file=sys.stderr)
            elif selecting:
                self.selection.restore(saved["selection"], saved["folder"])
        if saved is None and selecting and self.main:
            import shutil

            # an earlier run's generations
            shutil.rmtree(self.out / "validation", ignore_errors=True)
        if eval_before is None:
            eval_before = self.evaluate(self.eval_prompts,
                                        self.out / "eval_before_generations.jsonl", "evaluation")
        self.tracker.start(start if saved else None)
        if selecting and not self.selection.history:
            self.tracker.log({"step": 0, **self.select(0)})
        bar = self.tracker.progress(range(start, steps), desc=self.name, show=self.show_progress,
                                    unit="step", initial=start, total=steps)
        for step in bar:
            t0, tokens0 = time.perf_counter(), self.tokens_generated
            rec = run_state.checked_step(self, step_fn, step)  # a step that diverged stops the run
            seconds = time.perf_counter() - t0
            rec = {"step": step + 1, **rec, "lr": self.sched.get_last_lr()[0],
                   "step_seconds": round(seconds, 3),
                   "peak_memory_mb": round(peak_memory_mb(self.device), 1)}
            if self.tokens_generated > tokens0:  # a step that sampled
                rec["tokens_per_s"] = round((self.tokens_generated - tokens0) / max(seconds, 1e-9),
                                            2)
            if selecting and (step + 1 == steps
                              or (cfg.validate_every and (step + 1) % cfg.validate_every == 0)):
                rec.update(self.select(step + 1))
            self.tracker.log(rec)
            bar.set_postfix({k: f"{rec[k]:.4f}" for k in postfix if isinstance(rec.get(k), float)})
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                run_state.save_run_checkpoint(self, step + 1, eval_before, state(), selecting)
        bar.close()
        selected = {}
        if selecting:  # final/ and the evaluation after are the selected step's
            best = self.selection.best
            if best["step"] != max(start, steps):  # else the policy holds its weights already
                rt.wait()
                names = {n for n, p in self.policy.named_parameters() if p.requires_grad}
                rt.load_module_state(self.model, load_best(self.out / "best", names), strict=False)
            selected = {"selected_step": best["step"]}
            cost_extra = {**cost_extra, **selected, "selection": {
                "criterion": CRITERION, "max_over_refusal": cfg.select_max_over_refusal,
                "max_degenerate_rise": cfg.select_max_degenerate_rise,
                "validation_prompts": cfg.validation_prompts,
                "n_prompts": len(self.validation_prompts), **best},
                "validation": self.selection.history}
        eval_after = self.evaluate(self.eval_prompts, self.out / "eval_after_generations.jsonl",
                                   "evaluation")
        rt.wait()
        full = rt.gathered_state(self.model)  # a collective when sharded
        result = {"eval_before": eval_before, "eval_after": eval_after, **selected}
        if self.main:
            self.tracker.close()
            result = run_state.finish_run(self, result, full, steps=steps, **cost_extra)
            self.lock.release()
        rt.close()  # every process waits here, then the process group is torn down
        return result
