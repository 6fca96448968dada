"""Shared-prefix packing: a group's prompt encoded once, the group's completions after it.

GRPO samples G completions of each prompt. A plain training forward encodes each of the
N = B*G sequences whole, so every prompt token goes through the network G times, with
gradients computed G times. With attack prompts of hundreds of tokens the prompt is most of
each sequence. Here one row holds a prompt once and, each in its own slot, the completions
of it that the batch contains:

    row        [pad .. prompt | slot 0: completion a | slot 1: completion b | ...]
    attention  the prompt attends causally to itself; a slot attends to the prompt and
               causally to its own tokens, never to another slot
    positions  prompt 0 .. p-1; every slot p, p+1, ... (as if it followed the prompt alone)

Every completion token so sees exactly the keys, values and positions it sees in its own
sequence: log-probs, values and gradients are those of the plain forward (the equivalence
of Prefix Grouper, arXiv 2506.05433). It is one forward of the unchanged model with a
block attention mask, so LoRA, DDP, FSDP and gradient checkpointing need nothing special,
and the prompt's gradients (every LoRA layer sees them) are summed over its slots by
autograd, as the plain forward sums them over the group's rows.

Padding: prompt columns that are padding in every row of the batch, and completion
columns after the last real completion token, are dropped (exact: nobody attends to them
and positions follow the mask). Callers form micro-batches of groups with similar prompt
lengths (`bucketed_order`) so that one forward's rows need little left padding.

Shapes: n sequences in, R rows (distinct prompts), S slots per row (the most completions
of one prompt), P' prompt width, L' completion width, T = P' + S*L'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Decoder families whose HF implementation takes a custom 4D attention mask with explicit
# position ids unchanged (rotary positions, no learned absolute ones): the families the
# rollout engine samples from.
FAMILIES = ("llama", "mistral", "qwen2")
MASKED_ATTENTION = ("sdpa", "eager")


def _config(model):
    m = model
    while getattr(m, "config", None) is None and hasattr(m, "module"):  # DDP / FSDP1 wrappers
        m = m.module
    return getattr(m, "config", None)


def unsupported(model, length: int | None = None) -> str | None:
    """Why `model` cannot take the shared-prefix forward (None: it can). `length`: the
    longest position the forward needs, checked against a sliding attention window."""
    cfg = _config(model)
    if cfg is None:
        return "the model has no config"
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} is not one of {', '.join(FAMILIES)}"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in MASKED_ATTENTION:
        return f"attention implementation {impl!r} takes no block mask (sdpa and eager do)"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and length is not None and window < length:
        return f"sliding attention window {window} < sequence length {length}"
    return None


def forward_path(model, shared_prefix: bool) -> dict:
    """What cost.json records: the path the training and reference forwards take."""
    if not shared_prefix:
        return {"forward_path": "generic", "forward_path_reason": "shared_prefix is off"}
    why = unsupported(model)
    if why is not None:
        return {"forward_path": "generic", "forward_path_reason": why}
    return {"forward_path": "shared_prefix"}


def model_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                 shared_prefix: bool = True) -> tuple[dict, Packed | None, int]:
    """What a forward over sequences [n, P + L] gets: (keyword arguments, the packing or None,
    L'). Packed rows when `shared_prefix`, the model takes them and sequences share a prompt;
    else the sequences without all-padding columns, position ids following the mask."""
    if shared_prefix and unsupported(model, input_ids.shape[1]) is None:
        packed = pack(input_ids, attention_mask, n_completion)
        if packed is not None:
            return {"input_ids": packed.input_ids, "attention_mask": packed.attention_mask(model),
                    "position_ids": packed.position_ids}, packed, packed.width
    ids, attn, width = trim_columns(input_ids, attention_mask, n_completion)
    return {"input_ids": ids, "attention_mask": attn,
            "position_ids": (attn.cumsum(-1) - 1).clamp(min=0)}, None, width


def trim_columns(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int):
    """Left-pad every prompt (a right-padded prompt would put padding between it and its
    completion, where the next-token logit is read), then drop prompt columns that are
    padding in every row and completion columns after the last real completion token.
    Returns (ids, mask, L') with L' >= 1: the kept completion columns are the first L'."""
    P = input_ids.shape[1] - n_completion
    # [n, P] padding first, order kept
    move = torch.argsort(attention_mask[:, :P], dim=1, stable=True)
    input_ids = torch.cat([input_ids[:, :P].gather(1, move), input_ids[:, P:]], dim=1)
    attention_mask = torch.cat([attention_mask[:, :P].gather(1, move), attention_mask[:, P:]],
                               dim=1)
    p_keep = attention_mask[:, :P].any(0)  # [P]
    real = attention_mask[:, P:].any(0).nonzero()
    width = int(real.max()) + 1 if len(real) else 1
    cols = torch.cat([p_keep.nonzero().squeeze(1), torch.arange(P, P + width,
                                                                device=input_ids.device)])
    return input_ids[:, cols], attention_mask[:, cols], width


@dataclass
class Packed:
    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    allowed: torch.Tensor  # [R, T, T] bool: query t may attend key s
    # [S*L'] positions whose outputs are read: per slot, the one before each token
    keep: torch.Tensor
    targets: torch.Tensor  # [R*S, L'] each slot's completion tokens (0 in empty slots)
    seq_slot: torch.Tensor  # [n] the slot (index into R*S) of each input sequence
    slots: int  # S
    width: int  # L'
    n_completion: int  # L: the callers' completion width

    def attention_mask(self, model) -> torch.Tensor:
        """The 4D mask [R, 1, T, T] in the form the model's attention takes: bool for sdpa,
        additive float for eager."""
        cfg = _config(model)
        if getattr(cfg, "_attn_implementation", "sdpa") == "eager":
            dtype = getattr(cfg, "dtype", None) or torch.float32
            dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
            zero = torch.zeros((), dtype=dtype, device=self.allowed.device)
            return torch.where(self.allowed, zero, torch.finfo(dtype).min)[:, None]
        return self.allowed[:, None]

    def unpack(self, per_slot: torch.Tensor) -> torch.Tensor:
        """[R*S, L'] per slot -> [n, L] per input sequence (0 beyond L')."""
        out = per_slot.new_zeros(len(self.seq_slot), self.n_completion)
        out[:, :self.width] = per_slot[self.seq_slot]
        return out


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int) -> Packed | None:
    """Pack sequences [n, P + L] (prompt, padded either side; completion, right-padded) into
    one row per distinct prompt. None when no two sequences share a prompt (nothing to gain)."""
    device = input_ids.device
    ids, mask, width = trim_columns(input_ids, attention_mask, n_completion)
    P = ids.shape[1] - width
    p_ids, p_mask = ids[:, :P], mask[:, :P]  # [n, P]
    c_ids, c_mask = ids[:, P:], mask[:, P:]  # [n, L']
    key = torch.cat([p_ids * p_mask, p_mask], dim=1)
    # group [n]: the row of each sequence
    uniq, group = torch.unique(key, dim=0, return_inverse=True)
    R = len(uniq)
    counts = torch.bincount(group, minlength=R)
    S = int(counts.max())
    if S < 2:
        return None
    if int(uniq[:, P:].sum(1).min()) < 1:
        return None  # a sequence without prompt tokens has no prefix to share
    T = P + S * width  # trim_columns left-aligned the prompts: the longest fills the P columns
    # slot of each sequence: its rank among the sequences of its prompt, in input order
    order = torch.argsort(group * len(group) + torch.arange(len(group), device=device))
    first = torch.cumsum(counts, 0) - counts  # [R] where each row's sequences start in `order`
    slot = torch.empty_like(group)
    slot[order] = torch.arange(len(group), device=device) - first[group[order]]
    seq_slot = group * S + slot  # [n]

    # positions follow the mask, as in the plain forward: prompt 0 .. p-1, completion p, p+1, ...
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # [n, P + L']
    rep = torch.zeros(R, dtype=torch.long, device=device)
    rep[group] = torch.arange(len(group), device=device)  # one sequence of each row
    packed_ids = torch.zeros(R, T, dtype=ids.dtype, device=device)
    positions = torch.zeros(R, T, dtype=torch.long, device=device)
    valid = torch.zeros(R, T, dtype=torch.bool, device=device)
    packed_ids[:, :P], positions[:, :P], valid[:, :P] = p_ids[rep], pos[rep, :P], p_mask[rep].bool()
    cols = P + slot[:, None] * width + torch.arange(width, device=device)[None, :]  # [n, L']
    rows = group[:, None].expand_as(cols)
    packed_ids[rows, cols] = c_ids
    positions[rows, cols] = pos[:, P:]
    valid[rows, cols] = c_mask.bool()

    seg = torch.full((T,), -1, dtype=torch.long, device=device)  # -1 prompt, g slot g
    seg[P:] = torch.arange(S, device=device).repeat_interleave(width)
    idx = torch.arange(T, device=device)
    causal = idx[None, :] <= idx[:, None]  # [T(query), T(key)]
    same = (seg[None, :] == -1) | (seg[None, :] == seg[:, None])
    allowed = (causal & same)[None] & valid[:, None, :]
    # padding queries attend to themselves
    allowed |= torch.eye(T, dtype=torch.bool, device=device)[None]
    # the output before each completion token: the prompt's last for token 0, then the slot's own
    keep = torch.cat([torch.cat([torch.tensor([P - 1], device=device),
                                 P + g * width + torch.arange(width - 1,
                                                              device=device)]) for g in range(S)])
    targets = torch.zeros(R * S, width, dtype=ids.dtype, device=device)
    targets[seq_slot] = c_ids
    return Packed(packed_ids, positions, allowed, keep, targets, seq_slot, S, width, n_completion)


def bucketed_order(prompt_mask: torch.Tensor, group_size: int) -> list[int]:
    """Sequence indices with whole groups (rows i*G .. i*G+G-1) ordered by prompt length,
    so that consecutive micro-batches hold prompts of similar length (less left padding
    per forward). Stable: equal lengths keep their order."""
    lengths = prompt_mask.reshape(-1, group_size, prompt_mask.shape[1])[:, 0].sum(1)  # [B]
    groups = sorted(range(len(lengths)), key=lambda i: int(lengths[i]))
    return [i * group_size + g for i in groups for g in range(group_size)]
