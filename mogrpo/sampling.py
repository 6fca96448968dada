"""Drawing the next token from logits, as mogrpo's rollout engine samples (pure tensor
functions, hand-tested): argmax, or softmax(logits / temperature) within the top-p set, one
uniform per row through an fp64 inverse CDF (or torch.multinomial, as `generate` draws)."""

from __future__ import annotations

import torch


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor,
                cdf: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [N]: for each row of probs [N, V] (unnormalised, >= 0), the token whose
    interval of the cumulative distribution holds u [N] in (0, 1] of the total mass. The
    sum runs in fp64, so every token keeps its probability to ~1e-16 and a zero-probability
    token is never returned. `cdf`: an fp64 [N, V] buffer to reuse (a fresh 6 MB tensor per
    step costs its page faults again: ~3 ms at 16 x 49k on CPU)."""
    cdf = torch.cumsum(probs, -1, dtype=torch.float64, out=cdf)  # [N, V]
    return (torch.searchsorted(cdf, (u.to(torch.float64) * cdf[:, -1])[:, None]).squeeze(1)
            .clamp(max=probs.shape[1] - 1))


def next_tokens(logits: torch.Tensor, *, greedy: bool, temperature: float, top_p: float,
                draws: str = "inverse_cdf", cdf: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [N] drawn from logits [N, V] (any float dtype; the distribution is computed
    in fp32): argmax, or softmax(logits / temperature) restricted to the smallest set of
    tokens whose probability reaches top_p (always at least the most likely one), one draw
    per row from the global generator.

    `draws`: "inverse_cdf" (one uniform per row: N random numbers per step; `cdf` an fp64
    [N, V] buffer to reuse) or "multinomial" (`torch.multinomial`, as `generate` draws: on
    CPU it spends one exponential variate per vocabulary entry, 16 ms per step for 16 x 49k,
    more than a decoding step's matmuls). Both sample the same distribution; they use the
    random stream differently, so the same seed gives different ids.
    """
    if greedy:
        return logits.argmax(-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1)  # ascending
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if draws == "multinomial":
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    u = 1 - torch.rand(probs.shape[0], dtype=torch.float64, device=probs.device)  # (0, 1]
    return inverse_cdf(probs, u, cdf)
