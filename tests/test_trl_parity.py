"""Parity of `mogrpo.rl.losses.dpo_loss` with TRL's DPO/IPO loss on identical tensors.

TRL code called: trl 1.16.0, `trl/trainer/dpo_trainer.py`, `DPOTrainer.compute_loss` (which calls
`DPOTrainer._compute_loss`; the `loss_type == "sigmoid"` and `loss_type == "ipo"` branches are
there). That method only takes a model and a batch, so it runs on a bare
`object.__new__(DPOTrainer)` with the attributes it reads set as `DPOTrainer.__init__` sets them
from a `DPOConfig` (defaults read from the dataclass fields, so no `TrainingArguments.__post_init__`
and no global accelerate state). The "model" is a stub with the contract of TRL's fused LM head
(`add_fused_lm_head`, called with `fused_lm_head=True`): it returns a real `FusedCausalLMOutput`
whose per-token fields are given tensors, zeroed where the next-token label is -100. Reference
log-probs go in through the batch, as with `precompute_ref_log_probs=True`. Everything from the
summed log-probs to the loss is TRL's own code.

IPO in TRL divides each summed log-ratio by `completion_mask.sum(dim=1).clamp(min=1.0)` (the number
of completion tokens of that sequence); the completion never starts at position 0, so those are
exactly the tokens whose log-probs are summed. Our `dpo_loss` gets the same counts as
`chosen_len`/`rejected_len`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from mogrpo.rl.losses import dpo_loss

P, T = 16, 14  # pairs, sequence length (prompt + completion + right padding)


class _FusedHeadStub(torch.nn.Module):
    """Stands in for a causal LM patched by TRL's `add_fused_lm_head`: per-token outputs [B, T-1],
    zero where `labels[:, 1:] == -100` (as `FusedCausalLMOutput` documents)."""

    def __init__(self, per_token_logps: torch.Tensor):
        super().__init__()
        self.per_token_logps = per_token_logps

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head and labels.shape == input_ids.shape
        mask = labels[:, 1:] != -100
        zeros = torch.zeros_like(self.per_token_logps)
        return FusedCausalLMOutput(
            loss=None,
            log_probs=self.per_token_logps.masked_fill(~mask, 0.0),
            entropy=zeros.detach(),
            mean_logits=zeros.detach(),
            is_top1=torch.zeros_like(mask),
            label_mask=mask,
        )


def _trl_trainer(model: torch.nn.Module, beta: float, loss_type: str) -> DPOTrainer:
    defaults = {f.name: f.default for f in dataclasses.fields(DPOConfig)
                if f.default is not dataclasses.MISSING}
    args = SimpleNamespace(**{**defaults, "beta": beta, "loss_type": [loss_type],
                              "precompute_ref_log_probs": True})
    tr = object.__new__(DPOTrainer)
    tr.args = args
    tr.model = model
    tr.accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                                     gather_for_metrics=lambda t: t)
    # As in DPOTrainer.__init__ ("Training arguments" block and the metrics state).
    tr.beta = args.beta
    tr.precompute_ref_logps = args.precompute_ref_log_probs
    tr.loss_types = args.loss_type
    tr.loss_weights = args.loss_weights or [1.0] * len(tr.loss_types)
    tr.ld_alpha = args.ld_alpha
    tr.f_divergence_type = args.f_divergence_type
    tr.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    tr.label_smoothing = args.label_smoothing
    tr.use_weighting = args.use_weighting
    tr.aux_loss_enabled = False
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._total_train_tokens = 0
    tr._tp_size = 1
    return tr


def _batch(seed: int, dtype=torch.float64):
    """A TRL-layout batch ([chosen; rejected] rows) with varying prompt and completion lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(1, 5, (2 * P,), generator=g)
    comp_len = torch.randint(1, T - 4, (2 * P,), generator=g)
    pos = torch.arange(T)
    completion_mask = ((pos >= prompt_len[:, None]) & (pos < (prompt_len
                                                              + comp_len)[:, None])).long()
    attention_mask = (pos < (prompt_len + comp_len)[:, None]).long()
    input_ids = torch.randint(5, 50, (2 * P, T), generator=g) * attention_mask
    per_token = (-3.0 * torch.rand(2 * P, T - 1, generator=g, dtype=dtype)).requires_grad_(True)
    ref = -3.0 * comp_len.to(dtype) * torch.rand(2 * P, generator=g, dtype=dtype)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:P],
              "ref_rejected_logps": ref[P:]}
    return inputs, per_token, ref, comp_len


def _compare(beta: float, loss_type: str, seed: int, dtype=torch.float64, tol=1e-6):
    inputs, per_token, ref, comp_len = _batch(seed, dtype)
    model = _FusedHeadStub(per_token).train()
    tr = _trl_trainer(model, beta, loss_type)
    trl_loss = tr.compute_loss(model, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)

    shift_mask = inputs["completion_mask"][:, 1:].to(dtype)
    seq = (per_token * shift_mask).sum(dim=1)  # summed completion log-probs [2P]
    lens = inputs["completion_mask"].sum(dim=1).to(dtype)
    kw = {"chosen_len": lens[:P], "rejected_len": lens[P:]} if loss_type == "ipo" else {}
    ours, st = dpo_loss(seq[:P], seq[P:], ref[:P], ref[P:], beta=beta, loss_type=loss_type, **kw)
    (our_grad,) = torch.autograd.grad(ours, per_token)

    assert lens.tolist() == comp_len.to(dtype).tolist()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=tol, rel=tol)
    torch.testing.assert_close(our_grad, trl_grad, atol=tol, rtol=tol)
    m = tr._metrics["train"]
    assert st["chosen_reward"] == pytest.approx(m["rewards/chosen"][-1], abs=tol, rel=tol)
    assert st["rejected_reward"] == pytest.approx(m["rewards/rejected"][-1], abs=tol, rel=tol)
    assert st["reward_margin"] == pytest.approx(m["rewards/margins"][-1], abs=tol, rel=tol)
    assert st["reward_accuracy"] == pytest.approx(m["rewards/accuracies"][-1], abs=tol)
    return trl_loss.item()


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 1.0, 5.0])
def test_sigmoid_dpo_matches_trl(beta):
    _compare(beta, "sigmoid", seed=0)
    _compare(beta, "sigmoid", seed=1, dtype=torch.float32)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 1.0])
def test_ipo_per_token_average_matches_trl(beta):
    _compare(beta, "ipo", seed=2)
    _compare(beta, "ipo", seed=3, dtype=torch.float32)


def test_ipo_without_lengths_is_not_trls_form():
    """Guard that the batch really has lengths != 1, so the IPO parity above tests the division."""
    inputs, per_token, ref, comp_len = _batch(2)
    assert (comp_len > 1).any() and not torch.equal(comp_len[:P], comp_len[P:])
    model = _FusedHeadStub(per_token).train()
    trl_loss = _trl_trainer(model, 0.1, "ipo").compute_loss(model, inputs).item()
    seq = (per_token * inputs["completion_mask"][:, 1:]).sum(dim=1)
    summed_form = dpo_loss(seq[:P], seq[P:], ref[:P], ref[P:], beta=0.1, loss_type="ipo")[0].item()
    assert abs(summed_form - trl_loss) > 1e-3
