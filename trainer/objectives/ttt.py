"""EAGLE-3 training-time test: the drafter is unrolled on its own hidden states for K steps, and
step k's soft cross entropy to the target is weighted by decay^k.

    L = sum_{k=0..K-1} decay^k * mean_{valid (b, t) at step k}  - sum_x p_k(x) log q_k(x)

p_k = target_probs on the draft vocabulary, renormalised (no gradient); q_k = softmax(draft_logits)
in float32. The loss mask is the assistant mask shifted by k and also drops positions whose target
argmax is outside the draft vocabulary (the caller builds it). Each step is a mean over its own
valid positions, then the steps are summed (not averaged), as in the reference code.
Li et al., "EAGLE-3", arXiv 2503.01840, section 3.2; checked against SafeAILab/EAGLE
eagle/traineagle3/cnets.py (cb7e084) and SpecForge core/loss.py (a6b6b02): 7 steps, decay 0.8.
Metrics: acc_step_k, the share of valid positions whose draft argmax is the target's argmax.
"""

import torch

from specdec.trainer.config import TttConfig
from specdec.trainer.objectives import ObjectiveOutput, masked_mean, register_objective
from specdec.trainer.objectives.kd import soft_cross_entropy


@register_objective("ttt")
def ttt_loss(
    *,
    draft_logits: torch.Tensor,  # [B, K, T, V_d]
    target_probs: torch.Tensor,  # [B, K, T, V_d]
    loss_mask: torch.Tensor,  # [B, K, T] bool
    cfg: TttConfig,
) -> ObjectiveOutput:
    cross_entropy = soft_cross_entropy(draft_logits, target_probs)  # [B, K, T]
    steps = draft_logits.shape[1]
    per_step = torch.stack([masked_mean(cross_entropy[:, k], loss_mask[:, k]) for k in range(steps)])
    weights = cfg.decay ** torch.arange(steps, device=per_step.device, dtype=per_step.dtype)
    agree = draft_logits.argmax(dim=-1) == target_probs.argmax(dim=-1)
    metrics = {f"acc_step_{k}": masked_mean(agree[:, k].float(), loss_mask[:, k]).detach() for k in range(steps)}
    return ObjectiveOutput((weights * per_step).sum(), metrics)
