"""Rollout: B prompts x G sampled completions, with the masks and log-probs training needs.

Shapes: B prompts, G samples per prompt, N = B*G sequences, P prompt tokens (left-padded),
L completion tokens (right-padded after EOS), V vocabulary.

Sampling is seeded per chunk of prompts from (seed, step, index of the chunk's first
prompt in the global batch), so a rollout does not depend on how many processes share
the batch or on what ran before it: resumed and multi-process runs sample the same
completions as a single uninterrupted run.

Guided samples (beyond the paper). A policy that never produces a behaviour cannot be
rewarded for it: SmolLM2-135M-Instruct refuses about 0.5% of harmful requests when
sampled at temperature 1 (measured on 192 AdvBench samples), so a group of G on-policy
samples almost never contains the refusal that the reward model would prefer. With
`guided > 0`, the last `guided` samples of every group start from a fixed opener (by
default a refusal opener such as "I'm sorry, but I can't") and the policy writes the
rest. The opener is part of the completion, so the update moves its probability by the
advantage the reward model gives the whole answer: up on a harmful prompt where the
refusal is safe, down on a benign prompt where refusing costs actionability. This is
off-policy guidance inside the group, as in LUFFY (Yan et al. 2025, arXiv 2504.14945),
without its importance weighting: the opener tokens are treated as if sampled (ratio 1
with one optimisation pass). Every prompt gets the same number of guided samples,
whatever its kind, so the guidance itself carries no knowledge of which prompts are
harmful; only the reward does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [N, P] prompt tokens, left-padded; row i*G+g is prompt i
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, L] sampled tokens, pad after the first EOS
    completion_mask: torch.Tensor  # [N, L] 1 up to and including the first EOS
    prompts: list[str]  # [B] prompt texts (user turn)
    kinds: list[str]  # [B] harmful | benign
    completions: list[str]  # [N] decoded completions (special tokens removed)
    group_size: int  # G
    finished: torch.Tensor = field(default=None)  # [N] bool: ended with EOS (not cut at L)
    guided: torch.Tensor = field(default=None)  # [N] bool: started from a forced opener (guided sample)
    old_logp: torch.Tensor | None = None  # [N, L] behaviour log-probs; set by the loop when it makes
    # several passes over the rollout (with one pass they are the training forward's, detached)

    @property
    def input_ids(self) -> torch.Tensor:  # [N, P + L]
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # [N, P + L]
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


# Written for mogrpo: refusal openers for guided samples (short, so the policy writes the rest).
REFUSAL_OPENERS: tuple[str, ...] = (
    "I'm sorry, but I can't",
    "I can't help with",
    "I'm sorry, but I cannot",
    "I won't help with",
    "Sorry, I can't assist with",
    "I cannot provide",
)


def chat_texts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as the model's chat template with the assistant turn opened."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    return [f"User: {p}\nAssistant:" for p in prompts]


def completion_mask_from(ids: torch.Tensor, eos_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [N, L] that keeps tokens up to and including the first EOS; and finished [N]."""
    is_eos = torch.zeros_like(ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= ids == e
    # position of first EOS (L if none)
    L = ids.shape[1]
    pos = torch.where(is_eos, torch.arange(L).expand_as(ids), torch.full_like(ids, L))
    first = pos.min(dim=1).values  # [N]
    mask = torch.arange(L).expand_as(ids) <= first[:, None]
    return mask.long(), first < L


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.no_grad()
def generate_rollout(model, tokenizer, prompts: list[str], kinds: list[str], *, group_size: int,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int = 0, step: int = 0, first_index: int = 0,
                     chunk_prompts: int | None = None, greedy: bool = False, guided: int = 0,
                     openers: tuple[str, ...] | list[str] = REFUSAL_OPENERS) -> Rollout:
    """Sample `group_size` completions for each prompt with the KV cache, in chunks
    (`greedy`: the single most likely completion instead; group_size must be 1).

    `first_index` is the position of prompts[0] in the global batch (for seeding).
    `guided`: the last `guided` samples of each group start from one of `openers` (the
    opener's tokens are the first completion tokens; see the module docstring).
    """
    if greedy and group_size != 1:
        raise ValueError("greedy decoding gives one completion per prompt: use group_size=1")
    if not 0 <= guided < group_size:
        raise ValueError(f"guided = {guided} samples per group of {group_size}: use 0 <= guided < group_size "
                         "(at least one sample per group must be the policy's own)")
    if guided and not openers:
        raise ValueError("guided samples need at least one opener")
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    device = next(model.parameters()).device
    texts = chat_texts(tokenizer, prompts)
    chunk = chunk_prompts or len(prompts)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    parts = []
    was_training = model.training
    model.eval()
    own = group_size - guided
    opener_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in openers] if guided else []
    if any(len(o) >= max_new_tokens for o in opener_ids):
        raise ValueError(f"an opener is {max(map(len, opener_ids))} tokens, not shorter than "
                         f"max_new_tokens = {max_new_tokens}; use shorter openers or more tokens")
    guided_flags = []
    for start in range(0, len(prompts), chunk):
        enc = tokenizer(texts[start:start + chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        n = enc["input_ids"].shape[0]
        P = enc["input_ids"].shape[1]
        torch.manual_seed(hash((seed, step, first_index + start)) % (2 ** 31))
        out = model.generate(input_ids=enc["input_ids"].to(device),
                             attention_mask=enc["attention_mask"].to(device),
                             do_sample=not greedy, **sampling, max_new_tokens=max_new_tokens,
                             num_return_sequences=own,
                             pad_token_id=pad, eos_token_id=sorted(eos))
        comp = out[:, P:].cpu()  # [n * own, L']
        if guided:
            comp = _with_guided(model, enc, comp, n, own, guided, opener_ids, first_index + start, step, seed,
                                max_new_tokens, sampling, greedy, pad, eos, device)
        guided_flags.append(torch.tensor(([False] * own + [True] * guided) * n))
        parts.append((enc["input_ids"].repeat_interleave(group_size, 0),
                      enc["attention_mask"].repeat_interleave(group_size, 0), comp))
    if was_training:
        model.train()
    # Pad chunks to common prompt (left) and completion (right) lengths.
    P = max(p[0].shape[1] for p in parts)
    L = max(max(p[2].shape[1] for p in parts), 1)
    pids, pmask, cids = [], [], []
    for ids, mask, comp in parts:
        lp = P - ids.shape[1]
        pids.append(torch.nn.functional.pad(ids, (lp, 0), value=pad))
        pmask.append(torch.nn.functional.pad(mask, (lp, 0), value=0))
        cids.append(torch.nn.functional.pad(comp, (0, L - comp.shape[1]), value=pad))
    completion_ids = torch.cat(cids)
    cmask, finished = completion_mask_from(completion_ids, eos)
    completion_ids = torch.where(cmask.bool(), completion_ids, torch.full_like(completion_ids, pad))
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)  # padded past EOS already
    return Rollout(prompt_ids=torch.cat(pids), prompt_mask=torch.cat(pmask), completion_ids=completion_ids,
                   completion_mask=cmask, prompts=list(prompts), kinds=list(kinds),
                   completions=[c.strip() for c in completions], group_size=group_size,
                   finished=finished, guided=torch.cat(guided_flags))


def _with_guided(model, enc, comp, n, own, guided, opener_ids, first, step, seed, max_new_tokens,
                 sampling, greedy, pad, eos, device) -> torch.Tensor:
    """Generate the `guided` opener-started samples of each of the chunk's n prompts and
    interleave them after its `own` samples: completions [n * G, L'] (G = own + guided)."""
    rows, which = [], []
    for i in range(n):
        ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        for j in range(guided):
            k = (first + i + j * 7 + step) % len(opener_ids)  # deterministic, varied across prompts/steps
            rows.append(ids + opener_ids[k])
            which.append(k)
    width = max(map(len, rows))
    g_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left-padded [n * guided, P']
    g_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    torch.manual_seed(hash((seed, step, first, 1)) % (2 ** 31))
    shortest = min(len(o) for o in opener_ids)
    out = model.generate(input_ids=g_ids.to(device), attention_mask=g_mask.to(device), do_sample=not greedy,
                         **sampling, max_new_tokens=max_new_tokens - shortest, pad_token_id=pad,
                         eos_token_id=sorted(eos)).cpu()[:, width:]
    # opener + continuation, cut at max_new_tokens (a row that reaches it stays unfinished)
    g_comp = [(opener_ids[k] + out[r].tolist())[:max_new_tokens] for r, k in enumerate(which)]
    L = max(comp.shape[1], max(map(len, g_comp)))
    merged = torch.full((n * (own + guided), L), pad, dtype=comp.dtype)
    for i in range(n):
        for g in range(own):
            merged[i * (own + guided) + g, :comp.shape[1]] = comp[i * own + g]
        for j in range(guided):
            row = g_comp[i * guided + j]
            merged[i * (own + guided) + own + j, :len(row)] = torch.tensor(row)
    return merged


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                        *, temperature: float = 1.0, with_entropy: bool = False,
                        chunk_rows: int = 8) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N, L] of the last `n_completion` tokens (and their entropies [N, L]).

    Only the completion positions get logits (`logits_to_keep`), and the log-softmax runs
    in chunks of rows, so no [N, P+L, V] tensor is ever built. Position ids follow the
    attention mask, as in generation with left padding. Logits are divided by the sampling
    temperature so the log-probs are those of the behaviour distribution.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=n_completion + 1, use_cache=False)
    logits = out.logits[:, :-1]  # [N, L, V]: position t predicts completion token t
    targets = input_ids[:, -n_completion:]
    logps, ents = [], []
    for s in range(0, logits.shape[0], chunk_rows):
        lg = logits[s:s + chunk_rows].float() / temperature
        lsm = torch.log_softmax(lg, dim=-1)
        logps.append(lsm.gather(-1, targets[s:s + chunk_rows, :, None]).squeeze(-1))
        if with_entropy:
            with torch.no_grad():
                ents.append(-(lsm.exp() * lsm).sum(-1))
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)
