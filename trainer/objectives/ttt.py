"""EAGLE-3 training-time test: the drafter is unrolled on its own hidden states for K steps, and
step k's soft cross entropy to the target is weighted by decay^k.

    L = sum_{k=0..K-1} decay^k * mean_{valid (b, t) at step k}  - sum_x p_k(x) log q_k(x)

p_k = target_probs on the draft vocabulary, renormalised (no gradient); q_k = softmax(draft_logits)
in float32. K is the drafter's unroll depth (`draft.unroll_steps`); the loss mask comes with the
drafter's training inputs (for EAGLE-3: the predicted token is an assistant token and the target's
argmax lies in the draft vocabulary).
Reduction, a deviation from the references: each step is a mean over its own valid positions, then
the steps are summed. SafeAILab/EAGLE and SpecForge average each step over all positions of the
batch, masked ones counting 0, so a batch whose windows hold few assistant tokens, and the later
steps (whose shifted masks hold fewer positions), weigh less there; here every valid token weighs
the same within its step, whatever the batch's share of loss tokens, and decay^k alone sets the
weight of step k. The gradient direction within a step is the same; its scale differs by that share.
Li et al., "EAGLE-3", arXiv 2503.01840, section 3.2; checked against SafeAILab/EAGLE
eagle/traineagle3/cnets.py (cb7e084) and SpecForge core/loss.py (a6b6b02): 7 steps, decay 0.8.
No metrics of its own: the drafter's diagnostics log train/acc_step_k for every unrolled step.
"""

from dataclasses import dataclass

import torch

from specdec.trainer.objectives import ObjectiveOutput, masked_mean, register_objective, scatter_rows
from specdec.trainer.objectives.cross_entropy import soft_cross_entropy


@dataclass
class TttConfig:
    """EAGLE-3 training-time test: decayed weights over the unrolled steps (their number is the
    drafter's `draft.unroll_steps`, since every objective sees the same unroll)."""

    weight: float = 1.0
    decay: float = 0.8  # loss weight decay**k at unrolled step k (EAGLE-3 reference code)


@register_objective("ttt", config=TttConfig)
def ttt_loss(
    *,
    draft_logits: torch.Tensor,  # [N, V_d] at the N places where loss_mask is True
    target_probs: torch.Tensor,  # [N, V_d]
    loss_mask: torch.Tensor,  # [B, K, T] bool
    cfg: TttConfig,
) -> ObjectiveOutput:
    cross_entropy = scatter_rows(soft_cross_entropy(draft_logits, target_probs), loss_mask)  # [B, K, T]
    steps = loss_mask.shape[1]
    per_step = torch.stack([masked_mean(cross_entropy[:, k], loss_mask[:, k]) for k in range(steps)])
    weights = cfg.decay ** torch.arange(steps, device=per_step.device, dtype=per_step.dtype)
    return ObjectiveOutput((weights * per_step).sum())
