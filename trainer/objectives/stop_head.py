"""The window policy's supervised start: SpecDec++'s acceptance-prediction loss.

The head's acceptance logit l_i at draft token i (specdec.eval.window) is fitted to the token's
acceptance with class-weighted binary cross entropy on soft labels:

    L = sum_i [ w (1 - y_i) (-log(1 - sigmoid(l_i))) + y_i (-log sigmoid(l_i)) ]
        / ( w sum_i (1 - y_i) + sum_i y_i )

y_i = min(1, p(d_i) / q(d_i)) (labels: soft), the probability that sampled verification accepts
d_i; or y_i = 1 when the draft's argmax is the target's (labels: greedy), greedy verification's
verdict. w = reject_weight up-weights rejections (SpecDec++ uses 6: stopping late costs a wasted
verify slot, and rejections are the rarer class on its data). Only the head trains; the drafter is
frozen unless another objective trains it. Huang, Guo, Wang, "SpecDec++: Boosting Speculative
Decoding via Adaptive Candidate Lengths", COLM 2025, arXiv 2405.19715.
"""

from dataclasses import dataclass

import torch
from torch.nn.functional import softplus

from specdec.trainer.objectives import ObjectiveOutput, register_objective


@dataclass
class StopHeadConfig:
    """SpecDec++'s weighted BCE of the window head's acceptance logits."""

    weight: float = 1.0
    reject_weight: float = 6.0  # w_mis of SpecDec++
    labels: str = "soft"  # soft: min(1, p/q) (SpecDec++); greedy: greedy verification's verdict
    # h of the stop rule saved with the head (draft token i + 1 while P_i >= h); window_rl learns it
    threshold: float = 0.3


@register_objective("stop_head", config=StopHeadConfig)
def stop_head_loss(
    *,
    window_logits: torch.Tensor,  # [M] acceptance logits at the answer places of the unroll
    window_accept: torch.Tensor,  # [M] greedy verdicts, 0 or 1
    window_accept_soft: torch.Tensor,  # [M] min(1, p/q)
    cfg: StopHeadConfig,
) -> ObjectiveOutput:
    labels = (window_accept_soft if cfg.labels == "soft" else window_accept).float()
    logits = window_logits.float()
    rejected = cfg.reject_weight * (1 - labels)
    total = (rejected + labels).sum()
    if total == 0:
        return ObjectiveOutput(logits.sum() * 0)
    loss = (rejected * softplus(logits) + labels * softplus(-logits)).sum() / total
    predicted = torch.sigmoid(logits.detach())
    metrics = {
        "predicted": predicted.mean(),
        "label": labels.mean(),
        "greedy_accuracy": ((predicted >= 0.5).float() == window_accept).float().mean(),
    }
    return ObjectiveOutput(loss, metrics)
