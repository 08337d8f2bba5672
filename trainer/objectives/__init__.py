"""Training objectives, one per file, registered by name and combined by weight in a recipe.

Every objective is a plain function of keyword-only tensors over K unrolled draft steps:
    draft_logits  [B, K, T, V_d]  the draft's logits at step k, position t (predicting token t+k+1)
    target_probs  [B, K, T, V_d]  the teacher on the draft vocabulary at the same place (no gradient)
    loss_mask     [B, K, T] bool  True where the position counts
and returns ObjectiveOutput(loss, metrics): the unweighted scalar and diagnostics. Softmax runs in
float32; a batch with no valid position gives 0 with zero gradient. The config of each objective is
the dataclass the recipe schema registers under the same name (specdec.trainer.config.OBJECTIVES).
A new objective is one file here with `@register_objective(name)` and one import line below.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specdec.trainer.config import OBJECTIVES


@dataclass(frozen=True)
class ObjectiveOutput:
    loss: torch.Tensor  # 0-dim, unweighted
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached diagnostics


OBJECTIVE_FUNCTIONS: dict[str, Callable[..., ObjectiveOutput]] = {}


def register_objective(name: str) -> Callable:
    if name not in OBJECTIVES:
        raise ValueError(
            f"objective {name!r} has no config in specdec.trainer.config.OBJECTIVES ({', '.join(OBJECTIVES)}); "
            "add its dataclass there first"
        )

    def register(function: Callable[..., ObjectiveOutput]) -> Callable[..., ObjectiveOutput]:
        if name in OBJECTIVE_FUNCTIONS:
            first = OBJECTIVE_FUNCTIONS[name].__module__
            raise ValueError(f"objective {name!r} is registered twice: {first} and {function.__module__}")
        OBJECTIVE_FUNCTIONS[name] = function
        return function

    return register


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask`; 0 with zero gradient where nothing is valid."""
    count = mask.sum()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count.clamp(min=1)


from specdec.trainer.objectives import expected_accept, kd, lk, ttt  # noqa: E402 (they register here)

__all__ = [
    "OBJECTIVE_FUNCTIONS",
    "ObjectiveOutput",
    "expected_accept",
    "kd",
    "lk",
    "masked_mean",
    "register_objective",
    "ttt",
]
