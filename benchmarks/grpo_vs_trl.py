"""One GRPO step: mogrpo's `train_grpo` against Hugging Face TRL's `GRPOTrainer`, same work.

    python benchmarks/grpo_vs_trl.py [--mode lora|full|both] [--steps 4] [--repeats 2]
                                     [--policy builtin:smollm2-135m-instruct | random:qwen2.5-7b]
                                     [--reward-model runs/reward-default/model] [--device cpu|cuda]
                                     [--prompts default,benchmarks/results/attack_prompts.jsonl]
                                     [--group-size 4,8] [--prompts-per-step 2] [--micro-batch 8]
                                     [--sides mogrpo,mogrpo-generic,trl]

`--prompts` and `--group-size` take lists: every combination is measured in the same run,
sides interleaved (long prompts: `python benchmarks/attack_prompts.py` writes the file).
Side `mogrpo-generic` is mogrpo with `shared_prefix=false` (every sequence encoded whole).

TRL is a benchmark-only dependency (`pip install trl`, tested with 1.16.0). The policy,
the default prompts and the reward model come from mogrpo's asset cache (MOGRPO_CACHE)
and runs/reward-default/model. Writes benchmarks/results/grpo_vs_trl.json (every raw
figure: per-step seconds and phases, completion lengths, RSS, CPU utilisation and load
average of every run) and prints a markdown table.

Method. Every measurement is a fresh subprocess (so peak RSS is per run), alternating
mogrpo, TRL, mogrpo, TRL, ... (`--repeats` pairs per mode). Each run makes 1 warm-up step
and `--steps` timed steps; the tables report medians over all timed steps of all repeats
of a side, and the ratio mogrpo / TRL. mogrpo's step time is its own `step_seconds`
(metrics.jsonl: rollout -> score -> reference -> forward/backward -> optimizer -> log);
TRL's is the time between a `TrainerCallback`'s `on_step_begin` and `on_step_end`, which
encloses the same work (generation, scoring, reference, forward/backward, clipping,
optimizer and scheduler step). Peak memory is the child's `ru_maxrss` at its end (on
CUDA also `torch.cuda.max_memory_allocated`); the RSS right after each side's imports
(torch, transformers, peft, accelerate, tensorboard for mogrpo; trl, datasets and mogrpo's
reward code for TRL) is recorded too, and the table shows the peak above it. Per-phase
times come from mogrpo's own `PhaseTimer` (patched to keep per-step records) and, for
TRL, from timing wrappers around
`_generate`, `_calculate_rewards`, `_get_per_token_logps_and_entropies` and
`_generate_and_score_completions` in a subclass (nothing of TRL is copied).

Identical on both sides:
- policy and its tokenizer (mogrpo's `load_tokenizer`: left padding, pad = EOS if none),
  fp32 weights, the same chat template; the same prompts in the same order: both
  trainers get the same 4 prompts at every step (the TRL dataset is written in the
  order mogrpo's `step_prompt_indices` draws them from the prompt file);
- B = 4 prompts x G = 4 samples = 16 sequences per optimizer step, max 48 new tokens,
  temperature 1.0, top-p 1, no top-k, KV-cache `generate`;
- one optimisation pass per rollout (mogrpo mu=1, TRL num_iterations=1 with
  per_device_train_batch_size=16, gradient_accumulation_steps=1, steps_per_generation=1,
  so generation_batch_size = 16 and one TRL optimizer step = 16 sequences generated,
  scored, one reference forward, one forward/backward); neither computes separate
  behaviour log-probs (both reuse the training forward's, detached);
- loss: clipped surrogate (eps 0.2) + beta 0.04 x k3 KL to the reference, per-sequence
  token mean then batch mean (mogrpo loss_aggregation=grpo, TRL loss_type=grpo);
  advantages (r - group mean) / (group std + 1e-4);
- reference: LoRA -> the same model with adapters disabled; full fine-tuning -> a second
  frozen fp32 copy (mogrpo deep-copies, TRL loads it again from the folder);
- reward: mogrpo's `Scorer` on the same reward model, with mogrpo's default weights
  (safety 1, actionability 1, politeness 0.5, meaningfulness 0.5) combined by
  `weighted_sum`, actionability NaN on harmful prompts; TRL gets it as its single reward
  function (reward weight 1), so both score the same (prompt, completion) pairs with
  the same code in the same precision;
- LoRA r=16, alpha=32, dropout 0, all linear layers; AdamW (torch, not fused), weight
  decay 0, same LR, constant LR after 2 warm-up steps, grad-norm clip 1.0, seed 0;
- precision: bf16 autocast around fp32 weights where mogrpo's `precision=auto` picks it
  (CPU with avx512_bf16/AMX, or CUDA with bf16); TRL's equivalent is `bf16=True`
  (accelerate's mixed precision = autocast, weights stay fp32), with `use_cpu=True` on
  CPU; TRL's reference and policy log-prob passes run under `accelerator.autocast()`
  (for generation see below);
- threads: `torch.set_num_threads(--threads)` (default: all cores) in every child.

Different, by design of each library (not equalised):
- generation precision with LoRA: TRL generates through the autocast wrapper accelerate
  puts on the prepared model's forward. With full fine-tuning `generate` runs on that
  model, so it samples under bf16 autocast like mogrpo; with LoRA `PeftModel.generate`
  calls the base model's `generate`, which is not wrapped, so TRL samples in fp32 while
  mogrpo samples under bf16 autocast. The child records the dtype of the policy's logits
  during TRL's generation (`generation_logits_dtypes`); `--trl-generation-autocast` wraps
  TRL's generation in the same autocast to equalise it (off by default: the default
  measures TRL as a user gets it);
- (equalised, but worth knowing) TRL's gradient checkpointing defaults to True; it is
  turned off here because mogrpo does not checkpoint (on, it recomputes activations in
  the backward: slower, less memory);
- the log-prob head: mogrpo asks the model for logits of the completion positions only
  (`logits_to_keep`) and log-softmaxes them in chunks of 8 rows; TRL patches the model
  with its fused, chunked log-prob head, which on CPU (no Triton) projects every position
  of prompt + completion and masks afterwards (on CUDA with Triton, only the scored ones);
- sampling is seeded differently, so completions (and so their lengths and the padded
  sequence length of the training forward) differ; the JSON keeps each step's mean and
  max completion length of both sides so the work can be compared;
- bookkeeping: TRL computes clip-ratio statistics and gathers prompt/completion logs
  every step; mogrpo computes its own metrics, writes metrics.jsonl and TensorBoard
  scalars. Logging to the console/trackers, evaluation and checkpointing are off on both
  sides (mogrpo eval_prompts=none, save_every=0, sample_every=0; TRL report_to=none,
  logging/save/eval strategy no, log_completions False). mogrpo saves its final adapter
  or model after the last step (outside the timed steps, inside the run's RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("mogrpo", "mogrpo-generic", "trl")
PHASES = ("generation", "scoring", "reference", "policy_forward_backward", "other")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- children


def run_mogrpo(a, t0: float) -> dict:
    """train_grpo on the prompt file, with per-step phase records and completion lengths."""
    import torch

    from mogrpo import rollout
    from mogrpo.rl import engine, grpo
    from mogrpo.tracking import PhaseTimer

    torch.set_num_threads(a.threads)
    # train_grpo imports these; import them first so the after-imports RSS counts them
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    rss_imports = rss_mb()
    events: list[tuple[str, float, float]] = []  # (phase, start, seconds) in call order

    class RecordingTimer(PhaseTimer):
        def __call__(self, name):
            inner = super().__call__(name)

            class _T:
                def __enter__(self):
                    self.t = time.perf_counter()
                    inner.__enter__()

                def __exit__(self, *exc):
                    inner.__exit__(*exc)
                    events.append((name, self.t, time.perf_counter() - self.t))

            return _T()

    lengths: list[tuple[float, int]] = []
    original_rollout = rollout.generate_rollout

    def recording_rollout(*args, **kw):
        ro = original_rollout(*args, **kw)
        n = ro.completion_mask.sum(1).float()
        lengths.append((float(n.mean()), int(n.max())))
        return ro

    engine.PhaseTimer = RecordingTimer  # the run engine builds its timer from this name
    rollout.generate_rollout = recording_rollout  # the engine imports it at call time

    out = Path(a.workdir) / Path(a.result).stem
    cfg = grpo.GRPOConfig(
        policy=a.policy, reward_model=a.reward_model, lora_r=16 if a.mode == "lora" else 0,
        lora_alpha=32,
        lora_dropout=0.0, train_prompts=a.prompt_file, eval_prompts="none",
        validation_prompts="none",
        batch_size=a.batch_size,
        group_size=a.group_size, max_new_tokens=a.max_new_tokens, temperature=1.0, top_p=1.0,
        steps=1 + a.steps, num_iterations=1, micro_batch_size=a.micro_batch or a.batch_size,
        lr=a.lr, weight_decay=0.0, warmup_steps=2,
        lr_schedule="constant_with_warmup", grad_clip=1.0, beta=a.beta, loss_aggregation="grpo",
        seed=0, precision=a.precision, num_threads=a.threads, save_every=0, sample_every=0,
        guided_samples=0, balance_kinds=False, shared_prefix=a.child != "mogrpo-generic",
        cache_dir=os.environ.get("MOGRPO_CACHE"))
    grpo.train_grpo(cfg, out, show_progress=False)

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    cost = json.loads((out / "cost.json").read_text())
    steps = [e for e in events if e[0] != "evaluation"]
    starts = [i for i, e in enumerate(steps) if e[0] == "generation"]
    phases = []
    for k, i in enumerate(starts):
        seg = steps[i:starts[k + 1] if k + 1 < len(starts) else len(steps)]
        ph = {p: 0.0 for p in PHASES}
        for name, _, sec in seg:
            ph[name] = ph.get(name, 0.0) + sec
        ph["other"] = max(0.0, recs[k]["step_seconds"] - sum(v for p,
                                                             v in ph.items() if p != "other"))
        phases.append({p: round(v, 4) for p, v in ph.items()})
    first_step_at = steps[0][1] if steps else time.perf_counter()
    return {"step_seconds": [r["step_seconds"] for r in recs], "phases": phases,
            "completion_length_mean": [m for m, _ in lengths],
            "completion_length_max": [x for _, x in lengths],
            "setup_seconds": round(first_step_at - t0, 2),
            "rss_after_imports_mb": round(rss_imports, 1),
            "mogrpo_cost_json": cost, "precision": cost.get("precision")}


def run_trl(a, t0: float) -> dict:
    """TRL GRPOTrainer on the same prompts, with mogrpo's scorer as its reward function."""
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mogrpo.data.loaders import load_prompts
    from mogrpo.models import autocast_dtype, load_tokenizer, resolve_policy_path
    from mogrpo.reward.model import MultiAspectRewardModel
    from mogrpo.reward.objective import RewardObjective
    from mogrpo.reward.scoring import Scorer
    from mogrpo.rl.grpo import GRPOConfig as MogrpoConfig

    rss_imports = rss_mb()
    device = torch.device(a.device)
    amp = autocast_dtype(device, a.precision)
    defaults = MogrpoConfig()  # the reward weights and not-applicable rule mogrpo uses
    rm = MultiAspectRewardModel.load(a.reward_model, device=device)
    rm.autocast_dtype = amp
    scorer = Scorer(rm, {}, defaults.not_applicable)
    objective = RewardObjective.build(scorer.columns, defaults.weights, defaults.not_applicable)

    def mogrpo_reward(prompts, completions, text, kind, **_):
        """Combined mogrpo reward of each (prompt, completion) pair: rewards [N, 1, K] -> [N]."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = scorer.score(list(text), list(kind), [t.strip() for t in texts], 1)
        return objective.combine(rewards[:, 0]).tolist()

    path = resolve_policy_path(a.policy, os.environ.get("MOGRPO_CACHE"))
    tok = load_tokenizer(path)
    records = load_prompts(a.prompt_file)
    by_id = {r.id: r for r in records}
    order = json.loads(Path(a.trl_order_file).read_text())  # prompt ids, in mogrpo's step order
    chat = bool(getattr(tok, "chat_template", None))
    rows = [{"prompt": [{"role": "user", "content": by_id[i].text}] if chat
             else f"User: {by_id[i].text}\nAssistant:",
             "text": by_id[i].text, "kind": by_id[i].kind} for i in order]

    args = GRPOConfig(
        output_dir=str(Path(a.workdir) / Path(a.result).stem),
        use_cpu=device.type == "cpu", bf16=amp == torch.bfloat16, fp16=False,
        # --micro-batch m: both sides accumulate gradients over B/m micro-batches of m sequences;
        # TRL
        # still generates the whole step's B sequences at once (steps_per_generation = B/m).
        per_device_train_batch_size=a.micro_batch or a.batch_size,
        gradient_accumulation_steps=a.batch_size // (a.micro_batch or a.batch_size),
        steps_per_generation=a.batch_size // (a.micro_batch or a.batch_size),
        num_generations=a.group_size, num_iterations=1, max_completion_length=a.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=a.beta, epsilon=0.2, loss_type="grpo",
        scale_rewards="group",
        learning_rate=a.lr, weight_decay=0.0, lr_scheduler_type="constant_with_warmup",
        warmup_steps=2,
        max_grad_norm=1.0, optim="adamw_torch", max_steps=1 + a.steps, seed=0,
        shuffle_dataset=False,
        gradient_checkpointing=False, model_init_kwargs={"dtype": torch.float32},
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
        log_completions=False, disable_tqdm=True, dataloader_num_workers=0)

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with wall-clock totals per phase (reset by the step callback)."""

        phase: dict[str, float]  # set by the step callback

        def _timed(self, name, fn, *args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.phase[name] = self.phase.get(name, 0.0) + time.perf_counter() - t

        def _generate(self, prompts):
            # optional: generate under autocast as mogrpo does
            if a.trl_generation_autocast and amp is not None:
                with torch.autocast(device.type, dtype=amp):
                    return self._timed("generation", super()._generate, prompts)
            return self._timed("generation", super()._generate, prompts)

        def _calculate_rewards(self, *args, **kw):
            return self._timed("scoring", super()._calculate_rewards, *args, **kw)

        def _get_per_token_logps_and_entropies(self, *args, **kw):
            name = "policy_forward" if torch.is_grad_enabled() else "reference"
            return self._timed(name, super()._get_per_token_logps_and_entropies, *args, **kw)

        def _generate_and_score_completions(self, *args, **kw):
            return self._timed("rollout_total", super()._generate_and_score_completions, *args,
                               **kw)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds, self.phases, self.lengths, self.first_step_at = [], [], [], None

        def on_step_begin(self, args, state, control, **kw):
            trainer.phase = {}
            self.t = time.perf_counter()
            if self.first_step_at is None:
                self.first_step_at = self.t

        def on_step_end(self, args, state, control, **kw):
            sec = time.perf_counter() - self.t
            ph = trainer.phase
            glue = ph.get("rollout_total", 0.0) - ph.get("generation", 0.0) - ph.get("scoring",
                                                                                     0.0) - \
                ph.get("reference", 0.0)
            self.seconds.append(round(sec, 3))
            self.phases.append({
                "generation": round(ph.get("generation", 0.0), 4),
                "scoring": round(ph.get("scoring", 0.0), 4),
                "reference": round(ph.get("reference", 0.0), 4),
                # everything after the rollout: forward, loss, backward, clip, optimizer, scheduler
                "policy_forward_backward": round(sec - ph.get("rollout_total", 0.0), 4),
                "other": round(max(0.0, glue), 4),
                "policy_forward_only": round(ph.get("policy_forward", 0.0), 4)})
            m = trainer._metrics["train"]
            self.lengths.append((m["completions/mean_length"][-1], m["completions/max_length"][-1]))

    timer = StepTimes()
    peft_config = None if a.mode == "full" else LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = TimedGRPOTrainer(model=path, reward_funcs=[mogrpo_reward], args=args,
                               train_dataset=Dataset.from_list(rows), processing_class=tok,
                               peft_config=peft_config, callbacks=[timer])
    trainer.phase = {}
    # Check the precision TRL's generation really runs in: dtype of the policy's logits.
    gen_dtypes = set()
    head = trainer.model.get_output_embeddings()
    hook = head.register_forward_hook(
        lambda mod, inp,
        out: gen_dtypes.add(str(out.dtype)) if not torch.is_grad_enabled() else None)
    trainer.train()
    hook.remove()
    return {"step_seconds": timer.seconds, "phases": timer.phases,
            "completion_length_mean": [m for m, _ in timer.lengths],
            "completion_length_max": [int(x) for _, x in timer.lengths],
            "setup_seconds": round(timer.first_step_at - t0, 2),
            "rss_after_imports_mb": round(rss_imports, 1),
            "precision": "bf16" if args.bf16 else "fp32",
            "generation_logits_dtypes": sorted(gen_dtypes),
            "trl_generation_autocast": bool(a.trl_generation_autocast),
            "trl_config": {k: getattr(args, k) for k in (
                "per_device_train_batch_size", "gradient_accumulation_steps",
                "steps_per_generation",
                "generation_batch_size", "num_generations", "num_iterations", "loss_type", "beta",
                "bf16",
                "use_cpu", "gradient_checkpointing", "optim", "learning_rate",
                "max_completion_length",
                "scale_rewards", "multi_objective_aggregation")}}


def child(a) -> None:
    t0 = time.perf_counter()
    a.group_size = int(a.group_size)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    res = run_mogrpo(a, t0) if a.child.startswith("mogrpo") else run_trl(a, t0)
    import torch

    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    # cores kept busy on average; far below --threads means the machine was shared or idle-waiting
    res.update(side=a.child, mode=a.mode, repeat=a.repeat, peak_rss_mb=round(rss_mb(), 1),
               wall_seconds=round(wall, 2),
               cpu_utilisation=round((ru.ru_utime + ru.ru_stime) / wall, 2))
    if a.device == "cuda":
        res["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    Path(a.result).write_text(json.dumps(res, indent=2))


# ----------------------------------------------------------------------------- parent


def machine_info(device: str) -> dict:
    import torch

    info = {"cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    from mogrpo.models import bf16_supported_on_cpu

    info["cpu_bf16"] = bf16_supported_on_cpu()
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mogrpo", "trl", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def write_prompts(a, spec: str, batch_size: int, group_size: int,
                  workdir: Path) -> tuple[str, str, list[list[str]]]:
    """The prompt file mogrpo trains on (B prompts per step, each used once) and the same
    prompts in the order mogrpo draws them, for TRL's sequential sampler."""
    from mogrpo.data.prompts import load_prompt_set, step_prompt_indices

    B = batch_size // group_size
    n_steps = 1 + a.steps
    pool = load_prompt_set(spec, os.environ.get("MOGRPO_CACHE"), "train")
    if len(pool) < B * n_steps:
        raise SystemExit(f"{len(pool)} prompts, fewer than {B * n_steps} = {B} per step x "
                         f"{n_steps} steps")
    chosen = pool[:B * n_steps]
    workdir.mkdir(parents=True, exist_ok=True)
    prompt_file = workdir / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"id": p.id, "text": p.text,
                                               "kind": p.kind}) + "\n" for p in chosen))
    kinds = [p.kind for p in chosen]
    per_step = [[chosen[i].id for i in step_prompt_indices(kinds, B, s, 0,
                                                           False)] for s in range(n_steps)]
    order_file = workdir / "trl_order.json"
    order_file.write_text(json.dumps([i for step in per_step for i in step]))
    return str(prompt_file), str(order_file), per_step


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarise(runs: list[dict], key: str) -> dict:
    s = {}
    for side in SIDES:
        rs = [r for r in runs if r["side"] == side and r["key"] == key]
        if not rs:
            continue
        timed = [x for r in rs for x in r["step_seconds"][1:]]
        phases = {p: median([ph[p] for r in rs for ph in r["phases"][1:]]) for p in PHASES}
        s[side] = {"median_step_seconds": round(median(timed), 3), "timed_steps": len(timed),
                   "median_peak_rss_mb": round(median([r["peak_rss_mb"] for r in rs]), 1),
                   "median_rss_after_imports_mb": round(median([r["rss_after_imports_mb"]
                                                                for r in rs]), 1),
                   "median_peak_rss_above_imports_mb": round(median(
                       [r["peak_rss_mb"] - r["rss_after_imports_mb"] for r in rs]), 1),
                   "median_phase_seconds": {p: round(v, 3) for p, v in phases.items()},
                   "mean_completion_length": round(statistics.fmean(
                       [x for r in rs for x in r["completion_length_mean"][1:]] or [float("nan")]),
                       2),
                   "median_setup_seconds": round(median([r["setup_seconds"] for r in rs]), 2)}
        if any("peak_cuda_allocated_mb" in r for r in rs):
            s[side]["median_peak_cuda_allocated_mb"] = round(median([r["peak_cuda_allocated_mb"]
                                                                     for r in rs]), 1)
    if "trl" not in s or "mogrpo" not in s:
        return s
    m, t = s["mogrpo"], s["trl"]
    if "mogrpo-generic" in s:
        g = s["mogrpo-generic"]
        s["ratio_mogrpo_over_generic"] = {
            "step_seconds": round(m["median_step_seconds"] / g["median_step_seconds"], 3),
            "reference": round(m["median_phase_seconds"]["reference"]
                               / g["median_phase_seconds"]["reference"], 3),
            "policy_forward_backward": round(m["median_phase_seconds"]["policy_forward_backward"]
                                             / g["median_phase_seconds"]["policy_forward_backward"],
                                             3),
            "peak_rss_mb": round(m["median_peak_rss_mb"] / g["median_peak_rss_mb"], 3)}
    s["ratio_mogrpo_over_trl"] = {
        "reference": round(m["median_phase_seconds"]["reference"]
                           / t["median_phase_seconds"]["reference"], 3),
        "step_seconds": round(m["median_step_seconds"] / t["median_step_seconds"], 3),
        "peak_rss_mb": round(m["median_peak_rss_mb"] / t["median_peak_rss_mb"], 3),
        "peak_rss_above_imports_mb": round(m["median_peak_rss_above_imports_mb"]
                                           / t["median_peak_rss_above_imports_mb"], 3)}
    if "median_peak_cuda_allocated_mb" in m:
        s["ratio_mogrpo_over_trl"]["peak_cuda_allocated_mb"] = round(
            m["median_peak_cuda_allocated_mb"] / t["median_peak_cuda_allocated_mb"], 3)
    return s


def table(summary: dict, device: str) -> str:
    mem = "peak CUDA MB" if device == "cuda" else "peak RSS MB"
    key = "median_peak_cuda_allocated_mb" if device == "cuda" else "median_peak_rss_mb"
    rkey = "peak_cuda_allocated_mb" if device == "cuda" else "peak_rss_mb"
    lines = [(f"| run | mogrpo s/step | TRL s/step | time mogrpo/TRL | reference mogrpo/TRL | "
              f"mogrpo {mem} | "
              f"TRL {mem} | memory mogrpo/TRL | RSS above imports MB, mogrpo / TRL | completion "
              f"tokens, mogrpo / TRL |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run, s in summary.items():
        if "ratio_mogrpo_over_trl" not in s:
            continue
        m, t, r = s["mogrpo"], s["trl"], s["ratio_mogrpo_over_trl"]
        lines.append(f"| {run} | {m['median_step_seconds']:.2f} | {t['median_step_seconds']:.2f} | "
                     f"{r['step_seconds']:.3f} | {r['reference']:.3f} | {m[key]:.0f} | "
                     f"{t[key]:.0f} | {r[rkey]:.3f} | "
                     f"{m['median_peak_rss_above_imports_mb']:.0f} / "
                     f"{t['median_peak_rss_above_imports_mb']:.0f} | "
                     f"{m['mean_completion_length']:.1f} / {t['mean_completion_length']:.1f} |")
    generic = {run: s["ratio_mogrpo_over_generic"] for run,
               s in summary.items() if "ratio_mogrpo_over_generic" in s}
    if generic:
        lines += ["", "mogrpo (shared prefix) / mogrpo-generic (every sequence whole), same run:",
                  "",
                  "| run | step | reference | policy fwd/bwd + optimizer | peak RSS |",
                  "|---|---|---|---|---|"]
        lines += [f"| {run} | {g['step_seconds']:.3f} | {g['reference']:.3f} | "
                  f"{g['policy_forward_backward']:.3f} | "
                  f"{g['peak_rss_mb']:.3f} |" for run, g in generic.items()]
    lines += ["", "Median seconds per timed step, by phase:", "",
              "| run | side | " + " | ".join(PHASES) + " |", "|---|---|" + "---|" * len(PHASES)]
    for run, s in summary.items():
        for side in SIDES:
            if side in s:
                ph = s[side]["median_phase_seconds"]
                lines.append(f"| {run} | {side} | " + " | ".join(f"{ph[p]:.2f}" for p in PHASES)
                             + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="both", choices=["lora", "full", "both"])
    ap.add_argument("--steps", type=int, default=4,
                    help="timed steps per run (after 1 warm-up step)")
    ap.add_argument("--repeats", type=int, default=2, help="mogrpo/TRL pairs per mode")
    ap.add_argument("--policy", default="builtin:smollm2-135m-instruct",
                    help="a policy (builtin:, hub id, folder) or random:qwen2.5-0.5b|7b|14b "
                         "(Qwen2.5's shape, random "
                         "weights, no download: benchmarks/random_models.py)")
    ap.add_argument("--reward-model", default=str(ROOT / "runs" / "reward-default" / "model"))
    ap.add_argument("--prompts", default="default",
                    help="comma-separated: 'default' (mogrpo's training prompts) "
                    "and/or prompt files (e.g. benchmarks/results/attack_prompts.jsonl)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step (B * G)")
    ap.add_argument("--prompts-per-step", type=int, default=0,
                    help="B; when set, sequences per step = B * G "
                    "for every --group-size (else --batch-size)")
    ap.add_argument("--sides", default="mogrpo,trl", help="comma-separated, of " + ", ".join(SIDES))
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="sequences per forward/backward on both sides "
                    "(gradient accumulation; 0 = the whole step at once)")
    ap.add_argument("--group-size", default="4", help="G, comma-separated for several")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="mogrpo's rule: auto = bf16 autocast where the device supports it")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "grpo_vs_trl.json"))
    ap.add_argument("--trl-generation-autocast", action="store_true",
                    help="also wrap TRL's generation in bf16 autocast (it does not autocast there "
                         "with LoRA; "
                         "mogrpo does), to equalise precision instead of measuring TRL as it is")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    # internal: one measurement in a child process
    for name in ("--child", "--workdir", "--prompt-file", "--trl-order-file", "--result"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    sides = a.sides.split(",")
    if not set(sides) <= set(SIDES):
        raise SystemExit(f"--sides: of {', '.join(SIDES)}")
    groups = [int(g) for g in a.group_size.split(",")]
    batches = {G: a.prompts_per_step * G if a.prompts_per_step else a.batch_size for G in groups}
    for G, batch in batches.items():
        if batch % G:
            raise SystemExit("--batch-size must be a multiple of --group-size")
        if a.micro_batch and batch % a.micro_batch:
            raise SystemExit("--micro-batch must divide the step's sequences")
    from random_models import resolve

    from mogrpo.models import autocast_dtype

    # random:qwen2.5-7b -> a folder, built once
    a.policy = resolve(a.policy, os.environ.get("MOGRPO_CACHE"))
    amp = autocast_dtype(torch.device(a.device), a.precision)
    workdir = Path(tempfile.mkdtemp(prefix="grpo_vs_trl-"))
    modes = ["lora", "full"] if a.mode == "both" else [a.mode]
    cells = []  # (key, prompts spec, G, batch, prompt file, order file, prompt ids per step)
    for k, spec in enumerate(a.prompts.split(",")):
        label = "short" if spec == "default" else Path(spec).stem
        for G in groups:
            files = write_prompts(a, spec, batches[G], G, workdir / f"prompts-{k}-{G}")
            for mode in modes:
                cells.append((f"{mode} {label} G={G}", spec, G, batches[G], mode, *files))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(a.threads),
           "PYTHONUNBUFFERED": "1"}
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    runs = []
    for rep in range(a.repeats):
        for c, (key, _spec, G, batch, mode, prompt_file, order_file, _) in enumerate(cells):
            for side in sides:  # A B A B
                result = workdir / f"{side}-{c}-{rep}.json"
                cmd = [sys.executable, __file__, "--child", side, "--mode", mode, "--repeat",
                       str(rep),
                       "--workdir", str(workdir), "--prompt-file", prompt_file, "--trl-order-file",
                       order_file,
                       "--result", str(result), "--policy", a.policy, "--reward-model",
                       a.reward_model,
                       "--batch-size", str(batch), "--group-size", str(G),
                       "--micro-batch", str(a.micro_batch),
                       "--max-new-tokens", str(a.max_new_tokens), "--beta", str(a.beta), "--lr",
                       str(a.lr),
                       "--steps", str(a.steps), "--precision", a.precision, "--device", a.device,
                       "--threads", str(a.threads)] + (["--trl-generation-autocast"]
                                                       if a.trl_generation_autocast else [])
                print(f"[{time.strftime('%H:%M:%S')}] repeat {rep + 1}/{a.repeats} {key} {side} "
                      f"...",
                      file=sys.stderr, flush=True)
                load_before = os.getloadavg()[0]
                subprocess.run(cmd, check=True, env=env, cwd=ROOT)
                r = json.loads(result.read_text())
                r["key"] = key
                r["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0],
                                                                               2)]
                print(f"    steps {r['step_seconds']} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                      f"wall {r['wall_seconds']:.0f} s, CPU utilisation {r['cpu_utilisation']}, "
                      f"load {r['loadavg_1min_before_after']}", file=sys.stderr, flush=True)
                runs.append(r)
                if not a.keep:  # drop this run's folder (a full model is ~0.5 GB)
                    for d in workdir.glob(f"{side}-{c}-{rep}"):
                        shutil.rmtree(d, ignore_errors=True)
    summary = {c[0]: summarise(runs, c[0]) for c in cells}
    report = {
        "benchmark": "one GRPO optimizer step: mogrpo train_grpo vs TRL GRPOTrainer",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(a.device), "versions": versions(),
        "settings": {"policy": a.policy, "reward_model": a.reward_model, "prompts": a.prompts,
                     "cells": [{"run": c[0], "prompts": c[1], "group_size": c[2],
                                "batch_size": c[3],
                                "prompt_ids_per_step": c[7]} for c in cells], "sides": sides,
                     "max_new_tokens": a.max_new_tokens, "beta": a.beta, "lr": a.lr,
                     "steps": a.steps,
                     "warmup_steps": 1, "repeats": a.repeats, "device": a.device,
                     "threads": a.threads,
                     "precision": str(amp or "fp32"),
                     "trl_generation_autocast": a.trl_generation_autocast,
                     "micro_batch": a.micro_batch or a.batch_size,
                     "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                              "target_modules": "all-linear"}},
        "summary": summary, "runs": runs,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{report['command']}\n{report['date']}, {report['machine'].get('cpu_model')}, "
          f"{a.threads} threads, {report['machine'].get('memory_gib')} GiB, device {a.device}, "
          f"precision {report['settings']['precision']}\n")
    print(table(summary, a.device))
    print(f"\nwrote {out}")
    if a.keep:
        print(f"run folders: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
