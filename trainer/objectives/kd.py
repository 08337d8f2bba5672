"""Soft-label knowledge distillation: cross entropy from the target's distribution to the draft's.

    L = mean_{valid (b, k, t)}  - sum_x p(x) log q(x)

p = target_probs (on the draft vocabulary, no gradient), q = softmax(draft_logits) in float32
(computed block by block, see cross_entropy.py). The
cross entropy equals forward KL(p || q) plus the target's entropy, which does not depend on the
draft, so both have the same gradient; KL is reported as a metric (0 when the draft equals the
target). Every unrolled step weighs the same (see `ttt` for EAGLE-3's decayed weighting).
Hinton et al., "Distilling the Knowledge in a Neural Network", arXiv 1503.02531.
"""

from dataclasses import dataclass

import torch

from specdec.trainer.objectives import ObjectiveOutput, masked_mean, register_objective, scatter_rows
from specdec.trainer.objectives.cross_entropy import soft_cross_entropy


@dataclass
class KdConfig:
    """Soft-label cross entropy to the target's distribution."""

    weight: float = 1.0


@register_objective("kd", config=KdConfig)
def kd_loss(
    *,
    draft_logits: torch.Tensor,  # [N, V_d] at the N places where loss_mask is True
    target_probs: torch.Tensor,  # [N, V_d]
    loss_mask: torch.Tensor,  # [B, K, T] bool
    cfg: KdConfig,
) -> ObjectiveOutput:
    cross_entropy = scatter_rows(soft_cross_entropy(draft_logits, target_probs), loss_mask)  # [B, K, T]
    entropy = scatter_rows(-(target_probs.float() * target_probs.float().clamp(min=1e-30).log()).sum(-1), loss_mask)
    loss = masked_mean(cross_entropy, loss_mask)
    return ObjectiveOutput(loss, {"kl": masked_mean(cross_entropy - entropy, loss_mask).detach()})
