"""Acceptance metrics in the vLLM / EAGLE conventions, and the plot of acceptance by draft position.

tau                    = 1 + accepted / verify steps   (mean acceptance length, bonus included)
accept_rate            = accepted / (K * verify steps)
accept_rate_per_pos[i] = P(the first i+1 drafts of a step are accepted)   (unconditional, non-increasing)
"""

from dataclasses import dataclass
from pathlib import Path


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
