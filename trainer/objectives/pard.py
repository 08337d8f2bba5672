"""PARD-1: cross entropy of every kept token of the K mask blocks against the data's next token.

    L = - (1/N) sum_{(b, i, t) counted} log q(x_{t+1} | x_{<=t-i}, m^i)

Block 0 is ordinary next-token prediction; block i, whose query sees the prefix x_{<=t-i} and a chain
of i mask tokens, learns the (i+1)-th token ahead. The places are the COD-kept tokens
(specdec.trainer.drafters.cod) with t >= i whose next token x_{t+1} is an assistant token; the mean
runs over all N of them, as Hugging Face's causal-LM loss does over PARD's concatenated blocks.
An et al., "PARD: Accelerating LLM Inference with Low-Cost PARallel Draft Model Adaptation",
arXiv 2504.18583, section 3; checked against AMD-AGI/PARD pard/pard_train.py (6f279bf). PARD-1 counts
every non-pad token (`draft.loss_on_prompts=true`, as pard_llama3 sets); by default only answers
count (PARD-2's choice), since the drafter serves answers.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdec.trainer.objectives import ObjectiveOutput, register_objective


@dataclass
class PardConfig:
    """PARD-1's cross entropy over the K blocks (the blocks and COD are the drafter's: draft.k, draft.r)."""

    weight: float = 1.0


@register_objective("pard", config=PardConfig)
def pard_loss(
    *,
    draft_logits: torch.Tensor,  # [N, V] at the N counted places, in loss_mask.nonzero() order
    labels: torch.Tensor,  # [N] int64, x_{t+1}
    cfg: PardConfig,
) -> ObjectiveOutput:
    if len(labels) == 0:
        return ObjectiveOutput(draft_logits.sum() * 0)
    return ObjectiveOutput(F.cross_entropy(draft_logits.float(), labels))
