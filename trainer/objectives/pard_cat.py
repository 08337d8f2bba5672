"""PARD-2's target-aligned training (CAT): the K mask blocks weighted by how likely the target is
to reach them, with a KL term to the target's distribution.

    g_j     = p_T(x_j | x_{<j})                          the target's probability of the gold token
    w(i, t) = prod_{s=1..i} g_{t+1-s}                    (w = 1 in block 0)
    L = ce_weight * sum w * CE(x_{t+1}, q) / sum w  +  kl_weight * sum w * KL(p_T(. | x_{<=t}) || q) / sum w

over the counted places (b, i, t) of the blocks (see `pard`), q = q(. | x_{<=t-i}, m^i). w(i, t) is
the probability that the target itself emits the i gold tokens the mask-i prediction takes as
given: a place verification is likely to reach weighs more. The teacher p_T(. | x_{<=t}) is the
target teacher-forced on the gold prefix, the same for every block.
An et al., "PARD-2: Target-Aligned Parallel Draft Model for Dual-Mode Speculative Decoding",
arXiv 2605.08632; AMD-AGI/PARD pard/pard2_train.py (6f279bf): ce 0.1, kl 1.0, temperature 1.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdec.trainer.objectives import ObjectiveOutput, register_objective
from specdec.trainer.objectives.cross_entropy import soft_cross_entropy


@dataclass
class PardCatConfig:
    """PARD-2's weighted cross entropy plus KL to the target (needs the target's final state)."""

    weight: float = 1.0
    ce_weight: float = 0.1  # PARD-2 reference
    kl_weight: float = 1.0  # PARD-2 reference


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row, 0 log 0 = 0: [N, V] -> [N]."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


@register_objective("pard_cat", config=PardCatConfig)
def pard_cat_loss(
    *,
    draft_logits: torch.Tensor,  # [N, V] at the N counted places
    labels: torch.Tensor,  # [N] int64, x_{t+1}
    target_probs: torch.Tensor,  # [N, V] p_T(. | x_{<=t}), no gradient
    gold_weights: torch.Tensor,  # [N] w(i, t)
    cfg: PardCatConfig,
) -> ObjectiveOutput:
    if len(labels) == 0:
        return ObjectiveOutput(draft_logits.sum() * 0)
    weights = gold_weights.float() / gold_weights.float().sum().clamp(min=1e-30)
    cross_entropy = F.cross_entropy(draft_logits.float(), labels, reduction="none")
    kl = soft_cross_entropy(draft_logits, target_probs) - entropy(target_probs.float())
    ce_term, kl_term = (weights * cross_entropy).sum(), (weights * kl).sum()
    return ObjectiveOutput(
        cfg.ce_weight * ce_term + cfg.kl_weight * kl_term, {"ce": ce_term.detach(), "kl": kl_term.detach()}
    )
