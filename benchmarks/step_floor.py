"""Where a GRPO step's time goes, next to the hardware floor of each phase.

    python benchmarks/step_floor.py [--results benchmarks/results/grpo_vs_trl_long.json]
                                    [--side mogrpo] [--out benchmarks/results/step_floor.json]

For every run of a `grpo_vs_trl.py` result file (LoRA mode), the matmul FLOPs of one step are
counted by phase from the policy's shape and the step's real token counts (prompt tokens of
the step's prompts in the chat template, the side's mean completion length), and divided by
this CPU's GEMM throughput measured here, in the run's precision, on the policy's own layer
shapes. The ratio measured / floor says how far each phase is from what the arithmetic
alone would take.

FLOPs counted (multiply-adds x 2), per token unless said:
- linear layers: 2 * (q + k + v + o + gate + up + down weights) per layer; LoRA r adds
  2 * r * (in + out) per adapted linear;
- the LM head, 2 * hidden * vocab, only where a logit is needed (each completion token; in
  generation each decoded token);
- attention, 4 * heads * head_dim per (query, key) pair a query attends to (causal);
- the backward of a frozen linear computes only its input gradient (as many FLOPs as its
  forward), of a LoRA adapter its input and weight gradients; attention's backward twice
  its forward. So the policy forward/backward is about 2x a forward.
- the floor of each phase uses the work the method needs: the prompt once per group
  (`generation`'s prefill, `reference`, `policy_forward_backward`) and each completion
  once. Decoding is bound by memory bandwidth (one token per sequence per step reads every
  weight), not FLOPs; its floor here is the FLOP floor, which it cannot reach.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def shapes(cfg) -> dict[str, tuple[int, int]]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, i), "up": (h, i),
            "down": (i, h)}


def gemm_throughput(cfg, tokens: int, dtype: torch.dtype | None, repeats: int = 5) -> dict[str,
                                                                                           float]:
    """FLOP/s of x [tokens, in] @ W [in, out] for each layer shape and the LM head, in the
    run's precision (bf16 autocast = bf16 operands), the best of `repeats`."""
    out = {}
    dt = dtype or torch.float32
    for name, (k, n) in {**shapes(cfg), "head": (cfg.hidden_size, cfg.vocab_size)}.items():
        m = tokens if name != "head" else min(tokens, 1024)
        x, w = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
        x @ w  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            x @ w
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * m * k * n / best
    return out


def forward_flops(cfg, tokens: float, pairs: float, logits: float, lora_r: int) -> dict[str, float]:
    """FLOPs of one forward: `tokens` through every layer, `pairs` (query, key) attention
    pairs per layer, `logits` positions through the LM head; split by GEMM shape."""
    sh = shapes(cfg)
    L = cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    f = {name: 2 * k * n * tokens * L for name, (k, n) in sh.items()}
    f["lora"] = sum(2 * lora_r * (k + n) for k, n in sh.values()) * tokens * L
    f["attention"] = 4 * cfg.num_attention_heads * hd * pairs * L
    f["head"] = 2 * cfg.hidden_size * cfg.vocab_size * logits
    return f


def floor_seconds(flops: dict[str, float], tput: dict[str, float]) -> float:
    """Each GEMM shape at its measured rate; LoRA and attention at the slowest layer's rate
    (small or batched GEMMs run no faster than the layers')."""
    slow = min(v for k, v in tput.items() if k != "head")
    return sum(v / tput.get(k, slow) for k, v in flops.items())


def step_phases(cfg, prompts: list[int], G: int, L: float, lora_r: int, tput) -> dict[str, dict]:
    """FLOPs and floor seconds per phase of one step: B prompts of the given token counts,
    G completions of mean length L each."""
    B = len(prompts)
    N = B * G
    P_tok = float(sum(prompts))
    # causal pairs: a prompt of p tokens p(p+1)/2; a completion of L tokens after its prompt L*p +
    # L(L+1)/2
    prompt_pairs = sum(p * (p + 1) / 2 for p in prompts)
    comp_pairs = sum(G * (L * p + L * (L + 1) / 2) for p in prompts)
    fwd = forward_flops(cfg, P_tok + N * L, prompt_pairs + comp_pairs, N * L, lora_r)
    gen = forward_flops(cfg, P_tok + N * L, prompt_pairs + comp_pairs, N * L + B, 0)
    fb = {k: (2 * v if k != "lora" else 3 * v) for k, v in fwd.items()}  # forward + backward
    ref = forward_flops(cfg, P_tok + N * L, prompt_pairs + comp_pairs, N * L, 0)
    out = {}
    for name, f in (("generation", gen), ("reference", ref), ("policy_forward_backward", fb)):
        out[name] = {"gflop": round(sum(f.values()) / 1e9, 2),
                     "floor_seconds": round(floor_seconds(f, tput), 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results",
                    default=str(ROOT / "benchmarks" / "results" / "grpo_vs_trl_long.json"))
    ap.add_argument("--side", default="mogrpo")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_floor.json"))
    a = ap.parse_args()
    from transformers import AutoConfig

    from mogrpo.data.prompts import load_prompt_set
    from mogrpo.models import load_tokenizer, resolve_policy_path
    from mogrpo.rollout import chat_texts

    res = json.loads(Path(a.results).read_text())
    st = res["settings"]
    torch.set_num_threads(st.get("threads") or os.cpu_count())
    policy = resolve_policy_path(st["policy"], None)
    cfg = AutoConfig.from_pretrained(policy)
    tok = load_tokenizer(policy)
    dtype = torch.bfloat16 if "bfloat16" in str(st.get("precision")) else None
    results = Path(a.results).resolve()
    shown = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results.name
    report = {"results": str(shown), "side": a.side, "precision": str(dtype or "fp32"), "runs": {}}
    lines = ["| run | phase | measured s | GFLOP | floor s | measured / floor |",
             "|---|---|---|---|---|---|"]
    for cell in st["cells"]:
        run = cell["run"]
        if not run.startswith("lora") or a.side not in res["summary"][run]:
            continue
        s = res["summary"][run][a.side]
        pool = {p.id: p.text for p in load_prompt_set(cell["prompts"], None, "train")}
        steps = cell["prompt_ids_per_step"][1:]  # the timed steps
        lengths = [[len(tok(t, add_special_tokens=False)["input_ids"])
                    for t in chat_texts(tok, [pool[i] for i in ids])] for ids in steps]
        # mean per slot over the timed steps
        prompts = [round(sum(col) / len(col)) for col in zip(*lengths)]
        G, L = cell["group_size"], s["mean_completion_length"]
        tput = gemm_throughput(cfg, int(sum(prompts) + len(prompts) * G * L), dtype)
        phases = step_phases(cfg, prompts, G, L, 16, tput)
        for name, ph in phases.items():
            ph["measured_seconds"] = s["median_phase_seconds"][name]
            ph["measured_over_floor"] = round(ph["measured_seconds"] / ph["floor_seconds"], 1)
            lines.append(f"| {run} | {name} | {ph['measured_seconds']:.2f} | {ph['gflop']:.0f} | "
                         f"{ph['floor_seconds']:.2f} | {ph['measured_over_floor']:.1f} |")
        report["runs"][run] = {"prompt_tokens": prompts, "group_size": G,
                               "mean_completion_length": L,
                               "gemm_gflops_per_s": {k: round(v / 1e9, 1) for k, v in tput.items()},
                               "phases": phases}
    Path(a.out).write_text(json.dumps(report, indent=2))
    print("\n".join(lines))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
