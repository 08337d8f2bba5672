"""Acceptance metrics in the vLLM / EAGLE conventions, and the teacher-forced proxy logged in training.

    tau                    = 1 + accepted / verify steps   (mean acceptance length, bonus included)
    accept_rate            = accepted / drafted
    accept_rate_per_pos[i] = P(the first i+1 drafts of a step are accepted)   (unconditional, non-increasing)
    sim_tau                = 1 + sum_{k=1..K} prod_{i<=k} alpha_i,  alpha_i = sum_x min(p_i(x), q_i(x))

sim_tau is the closed-form expected acceptance length when alpha does not depend on the path
(Leviathan et al., arXiv 2211.17192, section 3.5), evaluated on the teacher-forced gold path.
"""

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class AcceptanceStats:
    tau: float
    accept_rate: float
    accept_rate_per_pos: list[float]  # length k
    verify_steps: int


def acceptance_stats(accepted_per_step: list[int], k: int) -> AcceptanceStats:
    steps = len(accepted_per_step)
    if steps == 0:
        return AcceptanceStats(1.0, 0.0, [0.0] * k, 0)
    accepted = sum(accepted_per_step)
    per_pos = [sum(n > i for n in accepted_per_step) / steps for i in range(k)]
    return AcceptanceStats(1 + accepted / steps, accepted / (k * steps), per_pos, steps)


def expected_acceptance_length(
    *,
    target_probs: torch.Tensor,  # [..., K, V]: step k's target distribution on the gold path
    draft_probs: torch.Tensor,  # [..., K, V]: the draft's distribution at the same positions
    valid: torch.Tensor | None = None,  # [...] bool: positions that count
) -> torch.Tensor:
    """sim_tau, the mean over valid positions of 1 + sum_k prod_{i<=k} alpha_i (a 0-dim tensor)."""
    alpha = torch.minimum(target_probs.float(), draft_probs.float()).sum(dim=-1)  # [..., K]
    per_position = 1 + alpha.cumprod(dim=-1).sum(dim=-1)
    if valid is None:
        return per_position.mean()
    return per_position[valid].mean() if valid.any() else per_position.new_tensor(1.0)


def plot_acceptance(series: dict[str, list[float]], path: Path, title: str) -> None:
    """Grouped bars of the acceptance rate by draft position, one colour per drafter, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    width = 0.8 / len(series)
    for index, (label, per_pos) in enumerate(series.items()):
        positions = [p + 1 + (index - (len(series) - 1) / 2) * width for p in range(len(per_pos))]
        axis.bar(positions, per_pos, width=width, label=label)
        for position, rate in zip(positions, per_pos, strict=True):
            axis.text(position, rate + 0.01, f"{rate:.2f}", ha="center", va="bottom", fontsize=7)
    length = max(len(per_pos) for per_pos in series.values())
    axis.set(xlabel="draft position", ylabel="P(accepted up to here)", ylim=(0, 1.15), title=title)
    axis.set_xticks(list(range(1, length + 1)))
    axis.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
