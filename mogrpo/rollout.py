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
    # [N] bool: started from a forced opener (guided sample)
    guided: torch.Tensor = field(default=None)
    # [N] long: tokens of the forced opener (0 for own samples)
    opener_len: torch.Tensor = field(default=None)
    # [N, L] tokens the loss trains (default: completion_mask); set
    loss_mask: torch.Tensor | None = None
    # by an algorithm that leaves some tokens out, e.g. openers whose sample did not refuse
    # [N, L] behaviour log-probs; set by the loop when it makes
    old_logp: torch.Tensor | None = None
    # several passes over the rollout (with one pass they are the training forward's, detached)
    requests: list[str] | None = None  # [B] the bare request of a prompt that wraps one (attack
    # templates): what the reward model judges the answer against; None = `prompts`
    chats: list | None = None  # [B] each prompt as asked (a string or a conversation)
    columns: dict | None = None  # {name: [B]} the prompt rows' columns (reward functions)

    @property
    def judged_requests(self) -> list[str]:  # [B]
        return self.requests if self.requests is not None else self.prompts

    @property
    def input_ids(self) -> torch.Tensor:  # [N, P + L]
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def trained_mask(self) -> torch.Tensor:  # [N, L] the tokens the loss trains
        return self.loss_mask if self.loss_mask is not None else self.completion_mask

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


def as_messages(prompt) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user turn; a conversation (a list of
    {"role", "content"} dicts: system message, history, the last user turn) is kept whole."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_text(prompt) -> str:
    """The user's request of a prompt: the string itself, or a conversation's last user turn
    (what the reward model judges the answer against)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def chat_texts(tokenizer, prompts: list) -> list[str]:
    """Each prompt (a string or a whole conversation, system message and history included)
    as the model's chat template with the assistant turn opened; without a template, as
    'Role: content' lines."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(as_messages(p), tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    return ["".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in as_messages(p))
            + "Assistant:" for p in prompts]


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


ENGINES = ("auto", "mogrpo", "generate")


class _Sampler:
    """Draws completions for left-padded prompts with mogrpo's engine (mogrpo/generation.py:
    shared prefill per group, static KV cache, fused step) or transformers' `generate`.
    Both sample softmax(logits / temperature) with top-p and nothing else: `generate` gets
    every other logits processor switched off explicitly, so a checkpoint's own
    generation_config (Qwen2.5: repetition_penalty 1.05, top_k 20) never changes the
    behaviour distribution the loss assumes."""

    def __init__(self, model, engine: str, *, greedy: bool, temperature: float, top_p: float,
                 eos: set[int],
                 pad: int):
        from mogrpo import generation

        if engine not in ENGINES:
            raise ValueError(f"rollout engine {engine!r}: use one of {', '.join(ENGINES)}")
        why = None if engine == "generate" else generation.unsupported(model)
        if engine == "mogrpo" and why is not None:
            raise ValueError(f"the mogrpo rollout engine cannot sample from this policy ({why}); "
                             "use rollout_engine=auto or generate")
        self.model, self.eos, self.pad = model, eos, pad
        self.sampling = dict(greedy=greedy, temperature=temperature, top_p=top_p)
        self.weights = None
        if engine != "generate" and why is None:
            self.weights = generation.snapshot(model, generation.compute_dtype(model))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeat: int,
                 max_new_tokens: int) -> torch.Tensor:
        """New tokens [R * repeat, L'] (CPU) for prompts [R, P]: row r * repeat + j is sample j of
        prompt r; pad after a row's first EOS; L' <= max_new_tokens."""
        from mogrpo.generation import sample

        device = next(self.model.parameters()).device
        ids, mask = input_ids.to(device), attention_mask.to(device)
        if self.weights is not None:
            return sample(self.weights, ids, mask, repeat=repeat, max_new_tokens=max_new_tokens,
                          eos_ids=self.eos,
                          pad_id=self.pad, **self.sampling).cpu()
        greedy = self.sampling["greedy"]
        extra = {} if greedy else {"temperature": self.sampling["temperature"],
                                   "top_p": self.sampling["top_p"],
                                   "top_k": 0}
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=not greedy, **extra,
                                  repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                                  max_new_tokens=max_new_tokens, num_return_sequences=repeat,
                                  pad_token_id=self.pad, eos_token_id=sorted(self.eos))
        return out[:, ids.shape[1]:].cpu()


@torch.no_grad()
def generate_rollout(model, tokenizer, prompts: list, kinds: list[str], *, group_size: int,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int = 0, step: int = 0, first_index: int = 0,
                     chunk_prompts: int | None = None, greedy: bool = False, guided: int = 0,
                     openers: tuple[str, ...] | list[str] = REFUSAL_OPENERS,
                     engine: str = "auto", max_prompt_length: int | None = None) -> Rollout:
    """Sample `group_size` completions for each prompt with the KV cache, in chunks
    (`greedy`: the single most likely completion instead; group_size must be 1).

    `first_index` is the position of prompts[0] in the global batch (for seeding).
    `guided`: the last `guided` samples of each group start from one of `openers` (the
    opener's tokens are the first completion tokens; see the module docstring).
    `engine`: "mogrpo" (mogrpo/generation.py: each prompt prefilled once for its group, a
    static KV cache, fused weights; Llama, Mistral and Qwen2 policies), "generate"
    (transformers' `model.generate`, any causal LM), or "auto" (mogrpo's where it applies).
    The two sample the same distribution; their random draws differ (see generation.py).
    `max_prompt_length`: keep only the last N tokens of each rendered prompt, as TRL does
    (None = all).
    """
    if greedy and group_size != 1:
        raise ValueError("greedy decoding gives one completion per prompt: use group_size=1")
    if not 0 <= guided < group_size:
        raise ValueError(f"guided = {guided} samples per group of {group_size}: use 0 <= guided < "
                         f"group_size "
                         "(at least one sample per group must be the policy's own)")
    if guided and not openers:
        raise ValueError("guided samples need at least one opener")
    texts = chat_texts(tokenizer, prompts)
    chunk = chunk_prompts or len(prompts)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    parts = []
    was_training = model.training
    model.eval()
    own = group_size - guided
    opener_ids = ([tokenizer(o, add_special_tokens=False)["input_ids"] for o in openers]
                  if guided else [])
    if any(len(o) >= max_new_tokens for o in opener_ids):
        raise ValueError(f"an opener is {max(map(len, opener_ids))} tokens, not shorter than "
                         f"max_new_tokens = {max_new_tokens}; use shorter openers or more tokens")
    draw = _Sampler(model, engine, greedy=greedy, temperature=temperature, top_p=top_p, eos=eos,
                    pad=pad)
    guided_flags, opener_lens = [], []
    for start in range(0, len(prompts), chunk):
        enc = tokenizer(texts[start:start + chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        if max_prompt_length:  # left padding: the last columns hold every row's last tokens
            enc = {k: enc[k][:, -max_prompt_length:] for k in ("input_ids", "attention_mask")}
        n = enc["input_ids"].shape[0]
        torch.manual_seed(hash((seed, step, first_index + start)) % (2 ** 31))
        comp = draw(enc["input_ids"], enc["attention_mask"], own, max_new_tokens)  # [n * own, L']
        lens = [0] * (n * group_size)
        if guided:
            comp, g_lens = _with_guided(draw, enc, comp, n, own, guided, opener_ids,
                                        first_index + start, step,
                                        seed, max_new_tokens, pad)
            for i in range(n):
                lens[i * group_size + own:(i + 1) * group_size] = \
                    g_lens[i * guided:(i + 1) * guided]
        guided_flags.append(torch.tensor(([False] * own + [True] * guided) * n))
        opener_lens.append(torch.tensor(lens, dtype=torch.long))
        parts.append((enc["input_ids"].repeat_interleave(group_size, 0),
                      enc["attention_mask"].repeat_interleave(group_size, 0), comp))
    del draw  # the engine's weight snapshot and cache go before anything else runs
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
    # padded past EOS already
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(prompt_ids=torch.cat(pids), prompt_mask=torch.cat(pmask),
                   completion_ids=completion_ids,
                   completion_mask=cmask, prompts=[prompt_text(p) for p in prompts],
                   kinds=list(kinds),
                   completions=[c.strip() for c in completions], group_size=group_size,
                   finished=finished, guided=torch.cat(guided_flags),
                   opener_len=torch.cat(opener_lens))


def _with_guided(draw, enc, comp, n, own, guided, opener_ids, first, step, seed, max_new_tokens, pad
                 ) -> tuple[torch.Tensor, list[int]]:
    """Generate the `guided` opener-started samples of each of the chunk's n prompts and
    interleave them after its `own` samples: completions [n * G, L'] (G = own + guided), and
    the opener's token count of each guided sample [n * guided]."""
    rows, which = [], []
    for i in range(n):
        ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        for j in range(guided):
            # deterministic, varied across prompts/steps
            k = (first + i + j * 7 + step) % len(opener_ids)
            rows.append(ids + opener_ids[k])
            which.append(k)
    width = max(map(len, rows))
    # left-padded [n * guided, P']
    g_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    g_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    torch.manual_seed(hash((seed, step, first, 1)) % (2 ** 31))
    shortest = min(len(o) for o in opener_ids)
    out = draw(g_ids, g_mask, 1, max_new_tokens - shortest)
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
    return merged, [min(len(opener_ids[k]), max_new_tokens) for k in which]


def opener_loss_mask(completion_mask: torch.Tensor, opener_len: torch.Tensor, credit: torch.Tensor
                     ) -> torch.Tensor:
    """The loss mask [N, L] with the forced opener tokens of the samples not in `credit` [N]
    (bool) left out (pure): their first opener_len [N] tokens are 0, the rest as
    completion_mask [N, L]. Own samples have opener_len 0 and are unchanged."""
    L = completion_mask.shape[1]
    pos = torch.arange(L)[None, :]  # [1, L]
    drop = (pos < opener_len[:, None]) & ~credit[:, None]  # [N, L]
    return completion_mask * (~drop).to(completion_mask.dtype)


def signed_opener_credit(adv: torch.Tensor, kinds: list[str]) -> torch.Tensor:
    """Which samples' forced refusal openers train (pure): bool [N] from advantages adv [N] and
    each sample's prompt kind [N]. A refusal opener is right on a harmful prompt and wrong on a
    benign one whatever follows it, so it is credited only with the push its kind warrants: up
    (A > 0) on harmful prompts, down (A < 0) on benign ones. A guided sample that goes on to
    comply (harmful, A < 0) or to answer well (benign, A > 0) trains its continuation, never
    its opener against the kind (docs/theory.md section 8)."""
    want = torch.tensor([1.0 if k == "harmful" else -1.0 if k == "benign" else 0.0 for k in kinds])
    return adv.detach().float().cpu() * want > 0


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(logits / T) at the target tokens, chunk by chunk of rows, with a hand-written
    backward. Autograd through `log_softmax(logits.float())` keeps every chunk's fp32 [rows, L, V]
    output for the backward (2 x 154 MB for 16 x 49 x 49k); this keeps only the logits the head
    already produced and recomputes one chunk's softmax at a time in the backward:
    d logp_t / d logits = (onehot(target) - softmax) / T."""

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, chunk_rows: int, with_entropy: bool):
        # logits [N, L, V] (any float dtype), targets [N, L] -> logp [N, L] fp32 (and entropy [N,
        # L])
        logp = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        ent = torch.empty(targets.shape, dtype=torch.float32,
                          device=logits.device) if with_entropy else None
        for s in range(0, logits.shape[0], chunk_rows):
            lsm = torch.log_softmax(logits[s:s + chunk_rows].float() / temperature, dim=-1)
            logp[s:s + chunk_rows] = lsm.gather(-1, targets[s:s + chunk_rows, :, None]).squeeze(-1)
            if with_entropy:
                ent[s:s + chunk_rows] = -(lsm.exp() * lsm).sum(-1)
        ctx.save_for_backward(logits, targets)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        if with_entropy:
            ctx.mark_non_differentiable(ent)
            return logp, ent
        return logp, None

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        logits, targets = ctx.saved_tensors
        T, c = ctx.temperature, ctx.chunk_rows
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], c):
            g = grad_logp[s:s + c, :, None].float()  # [n, L, 1]
            d = torch.softmax(logits[s:s + c].float() / T, dim=-1).mul_(-g)
            d.scatter_add_(-1, targets[s:s + c, :, None], g)
            grad[s:s + c] = d.div_(T)
        return grad, None, None, None, None


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        n_completion: int,
                        *, temperature: float = 1.0, with_entropy: bool = False,
                        chunk_rows: int = 8,
                        shared_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N, L] of the last `n_completion` tokens (and their entropies [N, L]); 0 at
    completion positions after the last real token of every row.

    With `shared_prefix` and a model that supports it (`packing.unsupported`), sequences that
    share a prompt are packed into one row that encodes the prompt once (`packing.pack`);
    otherwise each sequence is encoded whole, without the columns that are padding in every
    row. Only the completion positions get logits (`logits_to_keep`), and the log-softmax runs
    in chunks of rows in forward and backward (`_TokenLogProbs`), so no [N, P+L, V] tensor
    and no fp32 [N, L, V] tensor is ever built or kept. Position ids follow the attention
    mask, as in generation with left padding. Logits are divided by the sampling
    temperature so the log-probs are those of the behaviour distribution.
    """
    from mogrpo import packing

    inputs, packed, width = packing.model_inputs(model, input_ids, attention_mask, n_completion,
                                                 shared_prefix)
    out = model(**inputs, logits_to_keep=packed.keep if packed is not None else width + 1,
                use_cache=False)
    if packed is not None:
        # [R*S, L', V]
        logits, targets = out.logits.reshape(-1, width, out.logits.shape[-1]), packed.targets
    else:
        # position t predicts token t
        logits, targets = out.logits[:, :-1], inputs["input_ids"][:, -width:]
    logp, ent = _TokenLogProbs.apply(logits, targets, temperature, chunk_rows, with_entropy)
    if packed is not None:
        return packed.unpack(logp), (packed.unpack(ent) if with_entropy else None)
    pad = (0, n_completion - width)
    return torch.nn.functional.pad(logp, pad), (torch.nn.functional.pad(ent, pad)
                                                if with_entropy else None)
