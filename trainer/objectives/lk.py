"""LK losses: train on the acceptance rate itself rather than on a likelihood.

    alpha      = sum_x min(p(x), q(x))                    per valid (b, k, t), p the target (no gradient)
    lk_alpha:    L = mean  - log alpha                     gradient scaled by 1/alpha where acceptance is low
    lk_hybrid:   L = mean  lambda * KL(p || q) + (1 - lambda) * (1 - alpha),  lambda = exp(-d * sg(alpha))

sg = stop-gradient: lambda moves the weight from the smooth KL (while alpha is low) to total
variation 1 - alpha (once alpha is high). q = softmax(draft_logits) in float32. Both are 0 when the
draft equals the target. Both are means over valid positions.
This is the per-token form of vllm-project/speculators losses/eager.py (c05b95b): lambda is set by
each position's own alpha. SpecForge core/lk_loss.py (a6b6b02) differs: its lambda = s * exp(-d *
sg(mean alpha)) is one number per batch, from the batch's mean alpha, applied to the mean KL and the
mean (1 - alpha); the two agree when alpha is the same everywhere. Both typed configs use d = 1
(SpecForge's legacy CLI used 3). "LK losses", arXiv 2602.23881.
"""

from dataclasses import dataclass

import torch

from specdec.trainer.objectives import ObjectiveOutput, masked_mean, register_objective, scatter_rows


@dataclass
class LkAlphaConfig:
    """LK loss, -log alpha."""

    weight: float = 1.0


@dataclass
class LkHybridConfig:
    """LK loss, lambda * KL + (1 - lambda) * (1 - alpha) with lambda = exp(-kl_decay * sg(alpha))."""

    weight: float = 1.0
    kl_decay: float = 1.0  # SpecForge's and speculators' typed default; SpecForge's legacy CLI used 3


def _alpha_and_kl(draft_logits: torch.Tensor, target_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_q = torch.log_softmax(draft_logits.float(), dim=-1)
    p = target_probs.float()
    alpha = torch.minimum(p, log_q.exp()).sum(dim=-1)
    kl = (p * (p.clamp(min=1e-30).log() - log_q)).sum(dim=-1)
    return alpha, kl  # [N] each


@register_objective("lk_alpha", config=LkAlphaConfig)
def lk_alpha_loss(
    *,
    draft_logits: torch.Tensor,  # [N, V_d] at the N places where loss_mask is True
    target_probs: torch.Tensor,  # [N, V_d]
    loss_mask: torch.Tensor,  # [B, K, T] bool
    cfg: LkAlphaConfig,
) -> ObjectiveOutput:
    alpha, _ = _alpha_and_kl(draft_logits, target_probs)
    alpha = scatter_rows(alpha, loss_mask)
    loss = masked_mean(-alpha.clamp(min=1e-30).log(), loss_mask)
    return ObjectiveOutput(loss, {"alpha": masked_mean(alpha, loss_mask).detach()})


@register_objective("lk_hybrid", config=LkHybridConfig)
def lk_hybrid_loss(
    *,
    draft_logits: torch.Tensor,  # [N, V_d] at the N places where loss_mask is True
    target_probs: torch.Tensor,  # [N, V_d]
    loss_mask: torch.Tensor,  # [B, K, T] bool
    cfg: LkHybridConfig,
) -> ObjectiveOutput:
    alpha, kl = (scatter_rows(values, loss_mask) for values in _alpha_and_kl(draft_logits, target_probs))
    weight = torch.exp(-cfg.kl_decay * alpha.detach())
    loss = masked_mean(weight * kl + (1 - weight) * (1 - alpha), loss_mask)
    return ObjectiveOutput(
        loss, {"alpha": masked_mean(alpha, loss_mask).detach(), "kl": masked_mean(kl, loss_mask).detach()}
    )
