"""Soft-label knowledge distillation: cross entropy from the target's distribution to the draft's.

    L = mean_{valid (b, k, t)}  - sum_x p(x) log q(x)

p = target_probs (on the draft vocabulary, no gradient), q = softmax(draft_logits) in float32. The
cross entropy equals forward KL(p || q) plus the target's entropy, which does not depend on the
draft, so both have the same gradient; KL is reported as a metric (0 when the draft equals the
target). Every unrolled step weighs the same (see `ttt` for EAGLE-3's decayed weighting).
Hinton et al., "Distilling the Knowledge in a Neural Network", arXiv 1503.02531.
"""

import torch

from specdec.trainer.config import KdConfig
from specdec.trainer.objectives import ObjectiveOutput, masked_mean, register_objective


def soft_cross_entropy(draft_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum_x p log q per position: [..., V] -> [...]."""
    return -(target_probs.float() * torch.log_softmax(draft_logits.float(), dim=-1)).sum(dim=-1)


@register_objective("kd")
def kd_loss(
    *,
    draft_logits: torch.Tensor,  # [B, K, T, V_d]
    target_probs: torch.Tensor,  # [B, K, T, V_d]
    loss_mask: torch.Tensor,  # [B, K, T] bool
    cfg: KdConfig,
) -> ObjectiveOutput:
    cross_entropy = soft_cross_entropy(draft_logits, target_probs)
    entropy = -(target_probs.float() * target_probs.float().clamp(min=1e-30).log()).sum(dim=-1)
    loss = masked_mean(cross_entropy, loss_mask)
    return ObjectiveOutput(loss, {"kl": masked_mean(cross_entropy - entropy, loss_mask).detach()})
