"""The CUDA path: GRPO (LoRA and full), PPO and DPO for a few steps on a GPU with a tiny
random model, checking what the CPU tests check (finite losses, every trainable tensor
changes, resume equals uninterrupted) and what only a GPU has (bf16 autocast, the weights,
the merged generation copy and the reference on the device, CUDA peak memory in cost.json).
Marked `gpu`: skipped without CUDA (conftest.py); run with `pytest -m gpu`. FSDP across two
GPUs runs when the machine has two.

`MOGRPO_GPU_TESTS_ON_CPU=1 pytest tests/test_gpu.py` runs the same tests on a machine
without CUDA with the device checks flipped (the expected device is the CPU, the autocast
dtype what precision=auto gives there, peak memory the process's RSS, FSDP through
tests/fsdp_cpu_launch.py): a check of the tests themselves before a GPU is at hand.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import accelerate_launch, final_weights, kill_and_resume, run_overrides
from safetensors.torch import load_file

from mogrpo.models import autocast_dtype

ON_CPU = os.environ.get("MOGRPO_GPU_TESTS_ON_CPU") == "1"
if ON_CPU:  # not `gpu` then, so conftest.py does not skip them
    pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason=(
        "MOGRPO_GPU_TESTS_ON_CPU=1 is for machines without CUDA (here the runs would pick CUDA)"))
else:
    pytestmark = pytest.mark.gpu
DEVICE = "cpu" if ON_CPU else "cuda"
# What precision=auto gives on DEVICE (None: fp32): bf16 on CUDA, bf16 on a CPU with native
# bf16 arithmetic.
AMP = autocast_dtype(torch.device(DEVICE), "auto") if ON_CPU or torch.cuda.is_available() \
    else torch.bfloat16
# On top of the tiny runs of helpers.TINY: the precision the device picks (bf16 autocast on
# CUDA), no trackers.
GPU = {"precision": "auto", "report_to": []}


def _memory_mb() -> float:
    """What the run's peak memory may not exceed: half the GPU's, or the machine's RAM."""
    if ON_CPU:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20
    return torch.cuda.get_device_properties(0).total_memory / 2 ** 20 / 2


def _check_run(out: Path, changed_from: dict | None = None) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    cost = json.loads((out / "cost.json").read_text())
    assert cost["device"].startswith(DEVICE) and cost["precision"] == str(AMP or "fp32")
    assert cost["peak_memory_of"] == ("process max RSS" if ON_CPU
                                      else "torch.cuda.max_memory_allocated")
    assert 0 < cost["peak_memory_mb"] < _memory_mb()
    final = final_weights(out / "final")
    if changed_from is not None:
        same = [k for k in changed_from if k in final
                and torch.equal(changed_from[k].float(), final[k].float())]
        assert same == [], f"trainable tensors that did not change: {same[:5]}"
    return final


def _initial_adapter(policy, tmp_path) -> dict:
    """The LoRA adapter a run starts from (same seed), saved without training."""
    from mogrpo.models import load_policy

    torch.manual_seed(0)
    model, _ = load_policy(str(policy), lora_r=4, lora_alpha=8)
    model.save_pretrained(tmp_path / "init")
    return load_file(str(tmp_path / "init" / "adapter_model.safetensors"))


@pytest.mark.parametrize("algo", ["grpo", "ppo", "rloo"])
def test_online_algorithms_on_cuda(algo, tiny_qwen2_dir, tiny_reward_model_dir, prompt_file,
                                   tmp_path):
    from mogrpo.cli import main

    out = tmp_path / algo
    assert main(["train", algo, "--output", str(out), "--quiet",
                 *run_overrides(tiny_qwen2_dir, tiny_reward_model_dir, prompt_file, algo, GPU,
                                steps=3)]) == 0
    _check_run(out, changed_from=_initial_adapter(tiny_qwen2_dir, tmp_path))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_grpo_full_finetuning_on_cuda(dtype, tiny_qwen2_dir, tiny_reward_model_dir, prompt_file,
                                      tmp_path):
    """Full fine-tuning with its frozen reference copy on the GPU; fp32 master weights under
    bf16 autocast, or bf16 weights (policy_dtype=bf16; there an update below bf16's
    resolution, 2^-8 of the weight, is lost: at lr 1e-3 the norm weights, all 1.0, would not
    move, hence lr 1e-2 for that case and fp32 master weights in configs/scale/*-0.5b)."""
    from mogrpo.cli import main

    if dtype == "bf16" and AMP is None:
        pytest.skip(f"policy_dtype=bf16 needs bf16 compute, which {DEVICE} here does not have")
    out = tmp_path / "full"
    assert main(["train", "grpo", "--output", str(out), "--quiet", *run_overrides(
        tiny_qwen2_dir, tiny_reward_model_dir, prompt_file, "grpo", GPU, lora_r=0,
        lr=1e-3 if dtype == "fp32" else 1e-2, steps=3, policy_dtype=dtype)]) == 0
    start = load_file(str(tiny_qwen2_dir / "model.safetensors"))
    final = _check_run(out)
    assert final[next(iter(final))].dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
    moved = [k for k in start if k in final and not torch.equal(start[k].float(),
                                                                final[k].float().to(start[k].dtype)
                                                                  .float())]
    assert len(moved) == \
        len([k for k in start if k in final]), "every weight trains in full fine-tuning"


def test_dpo_on_cuda(tiny_qwen2_dir, tiny_reward_model_dir, prompt_file, tmp_path):
    from mogrpo.cli import main

    out = tmp_path / "dpo"
    assert main(["train", "dpo", "--output", str(out), "--quiet", *run_overrides(
        tiny_qwen2_dir, tiny_reward_model_dir, prompt_file, "dpo", GPU, epochs=2,
        batch_size=2)]) == 0
    _check_run(out, changed_from=_initial_adapter(tiny_qwen2_dir, tmp_path))


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_resume_on_cuda_equals_uninterrupted(algo, tiny_qwen2_dir, tiny_reward_model_dir,
                                             prompt_file, tmp_path, monkeypatch):
    """Killed after the step-2 checkpoint and resumed: the final adapter matches the
    uninterrupted run (CUDA kernels are run-to-run deterministic for these shapes)."""
    args = run_overrides(tiny_qwen2_dir, tiny_reward_model_dir, prompt_file, algo, GPU, steps=4,
                         save_every=2, generation_chunk=1)
    kill_and_resume(algo, args, tmp_path, monkeypatch)


def test_models_and_copies_live_on_the_gpu(tiny_qwen2_dir, tiny_reward_model_dir, prompt_file,
                                           tmp_path):
    """Every model the engine builds (policy, reward model, and what samples: the merged
    generation copy under `generate`, mogrpo's engine's weight snapshot otherwise) is on the
    GPU, frozen Linear weights are stored in bf16, and a step's statistics come back as
    Python floats read once (no per-micro-batch sync is needed to build them)."""
    from mogrpo.config import load_config
    from mogrpo.generation import compute_dtype, snapshot
    from mogrpo.rl.engine import Run
    from mogrpo.rl.grpo import GRPOConfig

    cfg = load_config(GRPOConfig, None, run_overrides(tiny_qwen2_dir, tiny_reward_model_dir,
                                                      prompt_file, "grpo", GPU, steps=1))
    run = Run(cfg, tmp_path / "run", name="grpo", show_progress=False)
    run.setup_optimizer(total_updates=1)
    stored = AMP or torch.float32  # frozen Linear weights (models.cast_frozen_linears)

    def frozen_linears(model) -> set:
        tied = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        return {m.weight.dtype for m in model.modules() if type(m) is torch.nn.Linear
                and not m.weight.requires_grad and m.weight.data_ptr() not in tied}

    devices = {p.device.type for p in run.policy.parameters()}
    devices |= {p.device.type for p in run.scorer.rm.parameters()}
    assert frozen_linears(run.policy) == {stored}  # the LoRA base layers
    if run.merged is not None:  # rollout_engine=generate: the merged copy samples
        devices |= {p.device.type for p in run.merged.model.parameters()}
        assert frozen_linears(run.merged.model) == {stored}
    else:  # mogrpo's engine samples from a snapshot of fused weights, built per rollout
        assert run.rollout_engine == "mogrpo", run.rollout_engine
        with run.amp_ctx():
            weights = snapshot(run.policy, compute_dtype(run.policy))
        fused = [weights.head] + [t for layer in weights.layers
                                  for t in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        devices |= {t.device.type for t in [*fused, weights.embed, weights.norm]}
        assert {t.dtype for t in fused} == {stored}
        del weights, fused
    assert devices == {DEVICE}
    ro = run.rollout(0)
    assert ro.completion_ids.device.type == "cpu" and ro.completion_mask.sum() > 0
    rewards = run.score(ro)
    adv = torch.randn(rewards.shape[0] * rewards.shape[1])
    rec = run.policy_update(ro, adv.to(run.device), beta=0.0, aggregation="grpo",
                            micro_batch_size=2)
    assert all(isinstance(v, float) and math.isfinite(v) for v in rec.values())
    run.lock.release()


@pytest.mark.skipif(not ON_CPU and torch.cuda.device_count() < 2,
                    reason="FSDP across GPUs needs two of them")
def test_fsdp_on_two_gpus_equals_one(tiny_qwen2_dir, tiny_reward_model_dir, prompt_file, tmp_path):
    from mogrpo.cli import main

    # both sample with `generate` (what FSDP samples with), so the two runs draw alike
    args = run_overrides(tiny_qwen2_dir, tiny_reward_model_dir, prompt_file, "grpo", GPU,
                         generation_chunk=1, precision="fp32", rollout_engine="generate")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "grpo", "--output", str(one), "--quiet", *args]) == 0
    # real FSDP on GPUs; on CPU processes (gloo) accelerate's FSDP path needs the test launcher
    script = str(Path(__file__).parent / "fsdp_cpu_launch.py") if ON_CPU else None
    proc = accelerate_launch("fsdp", ["train", "grpo", "--output", str(two), "--quiet", *args],
                             script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cost = json.loads((two / "cost.json").read_text())
    assert (cost["processes"], cost["sharding"]) == (2, "fsdp")
    a, b = final_weights(one / "final"), final_weights(two / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k
