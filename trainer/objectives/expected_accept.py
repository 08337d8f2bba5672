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

import torch

from specdec.trainer.config import ExpectedAcceptConfig
from specdec.trainer.objectives import ObjectiveOutput, masked_mean, register_objective


@register_objective("expected_accept")
def expected_accept_loss(
    *,
    draft_logits: torch.Tensor,  # [B, K, T, V_d]
    target_probs: torch.Tensor,  # [B, K, T, V_d]
    loss_mask: torch.Tensor,  # [B, K, T] bool
    cfg: ExpectedAcceptConfig,
) -> ObjectiveOutput:
    draft_probs = torch.softmax(draft_logits.float(), dim=-1)
    alpha = torch.minimum(target_probs.float(), draft_probs).sum(dim=-1)  # [B, K, T]
    log_alpha = torch.where(loss_mask, alpha.clamp(min=1e-30).log(), torch.full_like(alpha, -torch.inf))
    accepted = log_alpha.cumsum(dim=1).exp().sum(dim=1)  # [B, T]: expected accepted drafts
    loss = -masked_mean(accepted, loss_mask[:, 0])
    return ObjectiveOutput(loss, {"sim_tau": (1 - loss).detach(), "alpha": masked_mean(alpha, loss_mask).detach()})
