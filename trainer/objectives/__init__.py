"""Training objectives, one per file, registered by name with their config and combined by weight
in a recipe (`objective.NAME.weight` plus that objective's own fields).

An objective is a plain function of keyword-only tensors and `cfg`, its config dataclass. The
tensors it declares are the ones the drafter's training side provides (specdec.trainer.drafters),
e.g. for the multi-step objectives over K unrolled draft steps:
    loss_mask     [B, K, T] bool  True where step k at position t counts; N = loss_mask.sum()
    draft_logits  [N, V_d]        the draft's logits at those N places, in loss_mask.nonzero() order
    target_probs  [N, V_d]        the teacher on the draft vocabulary at the same places (no gradient)
Only the counted places carry logits: the drafter's LM head, the softmax and the loss never run
where nothing is learned (a third or more of a chat's positions). `scatter_rows` puts per-place
values back on the [B, K, T] grid. An objective returns ObjectiveOutput(loss, metrics): the
unweighted scalar and diagnostics. Softmax runs in float32; a batch with no valid position gives 0
with zero gradient. A new objective is one file
here with `@register_objective(name, config=...)` and one import line below.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specdec.trainer.registry import add_entry


@dataclass(frozen=True)
class ObjectiveOutput:
    loss: torch.Tensor  # 0-dim, unweighted
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached diagnostics


@dataclass(frozen=True)
class Objective:
    function: Callable[..., ObjectiveOutput]
    config: type  # its recipe dataclass: `weight` and the objective's own fields
    inputs: tuple[str, ...]  # the tensors it takes, by keyword, from the drafter's training side

    @property
    def module(self) -> str:
        return self.function.__module__


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, *, config: type) -> Callable:
    def register(function: Callable[..., ObjectiveOutput]) -> Callable[..., ObjectiveOutput]:
        inputs = tuple(p for p in inspect.signature(function).parameters if p != "cfg")
        add_entry(OBJECTIVES, name, Objective(function, config, inputs), kind="objective", module=function.__module__)
        return function

    return register


# A window policy's training tensors (specdec.eval.window): what the drafter's kind gives at the M
# answer places of its unroll (see trainer.drafters.eagle3.window_inputs) ...
WINDOW_INPUTS = frozenset(
    {"window_hidden", "window_stats", "window_step", "window_accept", "window_accept_soft", "window_mask"}
)
# ... and what DrafterModule's window head computes from them: acceptance logits [M] and log h, for the
# head being trained and for the behaviour copy that RL samples its rollouts from
WINDOW_POLICY_INPUTS = frozenset(
    {"window_logits", "window_log_threshold", "window_logits_behaviour", "window_log_threshold_behaviour"}
)


def scatter_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values [N] of the N places where `mask` [B, K, T] is True, back on its grid; 0 elsewhere."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask`; 0 with zero gradient where nothing is valid."""
    count = mask.sum()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count.clamp(min=1)


from specdec.trainer.objectives import ctc, expected_accept, kd, lk, pard, pard_cat, stop_head, ttt, window_rl  # noqa: E402 (they register here)

__all__ = [
    "OBJECTIVES",
    "WINDOW_INPUTS",
    "WINDOW_POLICY_INPUTS",
    "Objective",
    "ObjectiveOutput",
    "ctc",
    "expected_accept",
    "kd",
    "lk",
    "masked_mean",
    "pard",
    "pard_cat",
    "register_objective",
    "scatter_rows",
    "stop_head",
    "ttt",
    "window_rl",
]
