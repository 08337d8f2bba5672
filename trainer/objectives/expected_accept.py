"""Multi-step expected acceptance: maximise the number of drafted tokens the target accepts.

    alpha_k = sum_x min(p_k(x), q_k(x))                   acceptance at draft step k (= 1 - TV(p_k, q_k))
    L       = - mean_{(b, t)} sum_{k=1..K} prod_{i<=k} alpha_i     minus the expected accepted length

p_k is the target distribution (no gradient); q_k = softmax(draft_logits) in float32, teacher-forced
on the gold path. Exact for a chain when alpha does not depend on the path (Leviathan et al., "Fast
Inference from Transformers via Speculative Decoding", arXiv 2211.17192, section 3.5). The product
is exp(cumsum(log alpha)); a masked step ends the chain (its factor is 0). The mean runs over
positions whose first step is valid; min() has a subgradient. At the optimum (q = p) L = -K.
Metrics: sim_tau = 1 - L, the closed-form acceptance length that serving should approach.
"""

from dataclasses import dataclass

import torch

from specdec.trainer.objectives import ObjectiveOutput, masked_mean, register_objective, scatter_rows


@dataclass
class ExpectedAcceptConfig:
    """Minus the closed-form expected accepted length over the unrolled steps."""

    weight: float = 1.0


def expected_accepted(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_k prod_{i<=k} alpha_i over dim 1 (steps): alpha, mask [B, K, T] -> [B, T]; a masked step
    ends the chain. Computed as exp(cumsum(log alpha)), whose gradient stays finite."""
    log_alpha = torch.where(mask, alpha.clamp(min=1e-30).log(), torch.full_like(alpha, -torch.inf))
    return log_alpha.cumsum(dim=1).exp().sum(dim=1)


@register_objective("expected_accept", config=ExpectedAcceptConfig)
def expected_accept_loss(
    *,
    draft_logits: torch.Tensor,  # [N, V_d] at the N places where loss_mask is True
    target_probs: torch.Tensor,  # [N, V_d]
    loss_mask: torch.Tensor,  # [B, K, T] bool
    cfg: ExpectedAcceptConfig,
) -> ObjectiveOutput:
    draft_probs = torch.softmax(draft_logits.float(), dim=-1)
    alpha = scatter_rows(torch.minimum(target_probs.float(), draft_probs).sum(dim=-1), loss_mask)  # [B, K, T]
    loss = -masked_mean(expected_accepted(alpha, loss_mask), loss_mask[:, 0])
    return ObjectiveOutput(loss, {"sim_tau": (1 - loss).detach(), "alpha": masked_mean(alpha, loss_mask).detach()})
