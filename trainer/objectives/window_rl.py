"""The window policy trained by reinforcement learning against the measured cost of a step.

For each chain start (a position t where the unroll's step 0 counts) a group of G rollouts of the
behaviour policy decides, after each draft token i, whether to draft token i + 1 (specdec.eval.window):

    go_i ~ Bernoulli(sigmoid(z_i)),   z_i = (log P_i - log h) / temperature,   P_i = prod_{j<=i} sigmoid(l_j)

A rollout drafts n >= 1 tokens (1 + its leading "go"s, at most the K unrolled steps and the answer's
end); the verifier accepts the
longest accepted prefix of them (greedy: the recorded verdicts; sampled: each token accepted with
its min(1, p/q)), and the reward is the step's tokens per unit of measured time, relative to a plain
decoding step:

    r = (accepted + 1) / (c_verify(n) + c_draft_fixed + n c_draft) * c_verify(0)

Group-relative policy optimisation (GRPO: Shao et al., "DeepSeekMath", arXiv 2402.03300) without
a critic: advantages are rewards centred within the group, A = r - mean_G r (Dr. GRPO, Liu et al.,
arXiv 2503.20783: without GRPO's division by std_G r, which `scale_by_std` restores, a group where
drafting on gains much and one where it loses a little would weigh the same), and the loss is PPO's
clipped surrogate (Schulman et al., arXiv 1707.06347) over the rollout's decisions,

    L = -mean_rollouts min(rho A, clip(rho, 1 - eps, 1 + eps) A),
    rho = exp(log pi(decisions) - log pi_behaviour(decisions)),
    log pi(decisions) = sum_{i < n-1} log sigmoid(z_i) + [n < L] log sigmoid(-z_{n-1}),   L = the most it may draft,

with the behaviour policy a copy of the head refreshed every `sync_every` optimizer steps (so the
ratio and its clip matter between refreshes). The costs c are measured on the machine by a short
calibration at the start of the run (specdec.eval.calibrate, recorded in run.dir/window_costs.json)
or set here for another device. Reward shaped after PPOW (Jiang et al., arXiv 2605.14978; its
cost-aware speedup reward), the stop decision after SpecDec++ (arXiv 2405.19715); the drafter itself
stays frozen.
"""

from dataclasses import dataclass, field

import torch

from specdec.eval.window import StepCosts, speedup_reward
from specdec.trainer.objectives import ObjectiveOutput, register_objective, scatter_rows


@dataclass
class MeasuredCosts:
    """Seconds per step: plain decoding (verify[0]), the target's forward with n = 1..K drafts, and drafting."""

    verify: list[float] = field(default_factory=list)
    draft_per_token: float = 0.0
    draft_fixed: float = 0.0


@dataclass
class WindowRlConfig:
    """GRPO of the window policy against the measured speed of a step."""

    weight: float = 1.0
    group_size: int = 8  # rollouts per chain start
    clip: float = 0.2  # PPO's epsilon
    temperature: float = 0.25  # of the stochastic go-on rule
    sync_every: int = 4  # optimizer steps between refreshes of the behaviour policy
    sampled: bool = False  # acceptance as sampled verification (min(1, p/q)); False = greedy verdicts
    scale_by_std: bool = False  # GRPO's advantages (r - mean) / std; False: Dr. GRPO's r - mean
    costs: MeasuredCosts | None = None  # None: calibrated on this machine at the start of the run


def leading_run(flags: torch.Tensor) -> torch.Tensor:
    """[..., K] bool -> [...] int64: how many leading entries are True."""
    return flags.long().cumprod(dim=-1).sum(dim=-1)


def group_advantages(rewards: torch.Tensor, *, scale_by_std: bool, eps: float = 1e-6) -> torch.Tensor:
    """[C, G] rewards -> advantages centred within each group of G, divided by the group's std if
    `scale_by_std` (0 for a group that all tie)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return torch.where(std > eps, centred / (std + eps), torch.zeros_like(centred))


def decision_log_prob(go_logits: torch.Tensor, drafted: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """log pi of a rollout that drafted `drafted` >= 1 tokens: it went on after tokens 0..drafted-2
    and stopped after token drafted-1 (no stop decision when drafted == room, the most it may draft).
    go_logits [C, K] (decision i: draft token i + 1?), drafted [C, G], room [C] -> [C, G]."""
    steps = torch.arange(go_logits.shape[1], device=go_logits.device)
    went_on = steps < drafted[..., None] - 1  # [C, G, K]
    stopped = (steps == drafted[..., None] - 1) & (drafted < room[:, None])[..., None]
    go, stop = torch.nn.functional.logsigmoid(go_logits), torch.nn.functional.logsigmoid(-go_logits)
    return (went_on * go[:, None] + stopped * stop[:, None]).sum(dim=-1)


def clipped_surrogate(log_prob: torch.Tensor, log_prob_behaviour: torch.Tensor, advantages: torch.Tensor, clip: float):
    """-mean min(rho A, clip(rho) A) and the share of rollouts whose ratio was clipped."""
    ratio = (log_prob - log_prob_behaviour).exp()
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return -surrogate.mean(), ((ratio - 1).abs() > clip).float().mean()


@register_objective("window_rl", config=WindowRlConfig)
def window_rl_loss(
    *,
    window_logits: torch.Tensor,  # [M] the head's acceptance logits
    window_log_threshold: torch.Tensor,  # 0-dim log h
    window_logits_behaviour: torch.Tensor,  # [M] the behaviour copy's (no gradient)
    window_log_threshold_behaviour: torch.Tensor,
    window_accept: torch.Tensor,  # [M] greedy verdicts
    window_accept_soft: torch.Tensor,  # [M] min(1, p/q)
    window_mask: torch.Tensor,  # [B, K, T] the M places
    cfg: WindowRlConfig,
) -> ObjectiveOutput:
    if cfg.costs is None:
        raise ValueError("objective.window_rl.costs: not calibrated; specdec-train measures them before fitting")
    costs = StepCosts(tuple(cfg.costs.verify), cfg.costs.draft_per_token, cfg.costs.draft_fixed)
    starts = window_mask[:, 0]  # [B, T]
    if not starts.any():
        return ObjectiveOutput(window_logits.sum() * 0)

    def chains(values: torch.Tensor) -> torch.Tensor:  # [M] -> [C, K] at the chain starts, in (b, t) order
        return scatter_rows(values, window_mask).transpose(1, 2)[starts]

    room = leading_run(chains(torch.ones_like(window_logits)) > 0)  # [C]: answer tokens left to draft

    def go_logits_of(logits: torch.Tensor, log_threshold: torch.Tensor) -> torch.Tensor:  # [C, K]
        log_all_accepted = torch.nn.functional.logsigmoid(chains(logits.float())).cumsum(dim=1)
        return (log_all_accepted - log_threshold) / cfg.temperature

    go_logits = go_logits_of(window_logits, window_log_threshold)
    go_behaviour = go_logits_of(window_logits_behaviour, window_log_threshold_behaviour).detach()

    chain_count, steps = go_behaviour.shape
    may_go_on = torch.arange(steps, device=room.device) + 1 < room[:, None]  # [C, K]: token i + 1 exists
    draws = torch.rand(chain_count, cfg.group_size, steps, device=room.device)
    drafted = 1 + leading_run((draws < torch.sigmoid(go_behaviour)[:, None]) & may_go_on[:, None])  # [C, G]
    if cfg.sampled:
        accepts = torch.rand_like(draws) < chains(window_accept_soft.float())[:, None]
    else:
        accepts = (chains(window_accept.float()) > 0)[:, None].expand(-1, cfg.group_size, -1)
    steps_index = torch.arange(steps, device=room.device)
    accepted = leading_run(accepts & (steps_index < drafted[..., None]))  # [C, G]
    rewards = speedup_reward(accepted, drafted, costs).float()
    advantages = group_advantages(rewards, scale_by_std=cfg.scale_by_std)
    log_prob = decision_log_prob(go_logits, drafted, room)
    log_prob_behaviour = decision_log_prob(go_behaviour, drafted, room)
    loss, clipped = clipped_surrogate(log_prob, log_prob_behaviour, advantages, cfg.clip)
    served = 1 + leading_run((go_logits.detach() >= 0) & may_go_on)  # the serving rule: on while P_i >= h
    served_accepted = leading_run(accepts[:, 0] & (steps_index < served[:, None]))
    metrics = {
        "reward": rewards.mean(),
        "drafted": drafted.float().mean(),
        "accepted": accepted.float().mean(),
        "served_reward": speedup_reward(served_accepted, served, costs).float().mean(),
        "served_drafted": served.float().mean(),
        "threshold": window_log_threshold.detach().exp(),
        "clipped": clipped,
    }
    return ObjectiveOutput(loss, metrics)
