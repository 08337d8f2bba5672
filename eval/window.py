"""How many tokens to draft before verifying: a fixed window, or a learned stop policy.

A drafter that drafts token by token always drafts token 0, and after each draft token i (0-based)
asks its window whether to go on to token i + 1; a row's first "no" ends its chain at i + 1 tokens,
and the drafter stops once every row has stopped or `eval.k` tokens are drafted. Deciding after
token i is drafted, and keeping it, is SpecDec++'s order: the token that prompted the "stop" costs
nothing more to verify (a verify step's cost barely grows with its drafts), and no token is drafted
only to be thrown away.

The learned policy follows SpecDec++ (Huang, Guo, Wang, COLM 2025, arXiv 2405.19715): a small head
reads the drafter's state that produced token i (its hidden state, the draft distribution's top-1
probability and entropy, and i) and predicts a_i = P(token i is accepted | tokens < i were). The
chain goes on while the predicted probability that all of it is accepted stays high enough:

    P_i = prod_{j <= i} sigmoid(head(state_j))          draft token i + 1  iff  P_i >= h

which is SpecDec++'s threshold rule (stop once P(some draft is rejected) > 1 - h). The threshold h
is a parameter of the head: `stop_head` trains the head's acceptance logits, `window_rl` trains
both against the measured cost of a step (specdec.trainer.objectives). During RL the same rule is
stochastic, go on with probability sigmoid((log P_i - log h) / temperature); at serving it is the
rule above. `StepCosts` is the cost model the RL reward and the report use.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class Window(Protocol):
    def start(self, batch: int, device: torch.device) -> None:
        """A new chain for `batch` rows."""

    def go_on(self, step: int, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Whether to draft token `step + 1` after token `step`, per row [B] bool, from the drafter's
        state that produced token `step`: hidden [B, H] and the logits it was drawn from [B, V]."""


class FixedWindow:
    """Every chain has k tokens: fixed K = k, as a window (for tests and the cost calibration)."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"FixedWindow({k}): a window drafts at least one token")
        self.k = k

    def start(self, batch: int, device: torch.device) -> None:
        self.batch, self.device = batch, device

    def go_on(self, step: int, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.full((self.batch,), step + 1 < self.k, dtype=torch.bool, device=self.device)


def draft_on(lengths: torch.Tensor, go_on: torch.Tensor, drafted: int) -> bool:
    """The stop rule of a chain, per row: a row whose chain has all `drafted` tokens so far and whose
    window says go on gets one more (lengths [B] updated in place); a row's first "no" ends it.
    Whether any row still drafts."""
    lengths += go_on & (lengths == drafted)
    return bool((lengths > drafted).any())


def chain_lengths(window: Window, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """How many of K tokens drafted in one forward a window keeps, per row [B] int64 in 1..K, from
    the states that produced them (hidden [B, K, H], logits [B, K, V]): the decisions it would take
    token by token, asked after the forward instead of between forwards."""
    batch, k = logits.shape[:2]
    window.start(batch, logits.device)
    lengths = torch.ones(batch, dtype=torch.long, device=logits.device)
    for step in range(k - 1):
        if not draft_on(lengths, window.go_on(step, hidden[:, step], logits[:, step]), step + 1):
            break
    return lengths


def logit_stats(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [..., 2] float32: the top-1 probability and the entropy (nats) of softmax(logits)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    return torch.stack([probs.amax(dim=-1), -(probs * log_probs).sum(dim=-1)], dim=-1)


@dataclass(frozen=True)
class WindowHeadConfig:
    hidden_size: int  # the drafter's hidden state it reads
    max_steps: int = 16  # draft positions it has an embedding for (eval.k at most)
    width: int = 64
    threshold: float = 0.5  # h at the start: draft token i + 1 while P_i >= h
    temperature: float = 0.25  # of the stochastic rule that RL samples from


class WindowHead(nn.Module):
    """Acceptance logits from the drafter's state: an MLP over the normed hidden state, the top-1
    probability and entropy of the draft distribution, and an embedding of the draft position."""

    def __init__(self, cfg: WindowHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False)
        self.hidden_proj = nn.Linear(cfg.hidden_size, cfg.width)
        self.stats_proj = nn.Linear(2, cfg.width)
        self.step_embed = nn.Embedding(cfg.max_steps, cfg.width)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, cfg.width), nn.SiLU(), nn.Linear(cfg.width, 1))
        self.log_threshold = nn.Parameter(torch.tensor(math.log(cfg.threshold)))

    def forward(self, hidden: torch.Tensor, stats: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """hidden [..., H], stats [..., 2] (`logit_stats`), step [...] int64 -> acceptance logits [...]."""
        dtype = self.hidden_proj.weight.dtype
        x = self.hidden_proj(self.norm(hidden.to(dtype))) + self.stats_proj(stats.to(dtype)) + self.step_embed(step)
        return self.mlp(x)[..., 0]


class LearnedWindow:
    """The engine's side of a WindowHead: the threshold rule on the running product P_i, per row."""

    def __init__(self, head: WindowHead) -> None:
        self.head = head.eval()

    def start(self, batch: int, device: torch.device) -> None:
        self.log_all_accepted = torch.zeros(batch, device=device)

    @torch.inference_mode()
    def go_on(self, step: int, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        steps = torch.full(hidden.shape[:1], min(step, self.head.cfg.max_steps - 1), device=hidden.device)
        accept = self.head(hidden, logit_stats(logits), steps).float()
        self.log_all_accepted = self.log_all_accepted + torch.nn.functional.logsigmoid(accept)
        return self.log_all_accepted >= self.head.log_threshold.float()


WINDOW_DIR = "window"  # a drafter directory's subdirectory holding its window head


def save_window_head(head: WindowHead, directory: str | Path) -> Path:
    directory = Path(directory) / WINDOW_DIR
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(asdict(head.cfg), indent=1) + "\n")
    save_file(
        {name: tensor.detach().float().contiguous() for name, tensor in head.state_dict().items()},
        directory / "model.safetensors",
    )
    return directory


def has_window_head(directory: str | Path) -> bool:
    return (Path(directory) / WINDOW_DIR / "model.safetensors").is_file()


def load_window_head(directory: str | Path) -> WindowHead:
    """The window head saved in a drafter directory (by a run with objective stop_head or window_rl)."""
    where = Path(directory) / WINDOW_DIR
    if not has_window_head(directory):
        raise FileNotFoundError(
            f"{where}: no window head here. eval.window=policy serves a drafter with the stop policy that "
            "`specdec-train` saves beside it when the recipe has objective.stop_head or objective.window_rl "
            "(e.g. recipe=smollm2_window); train one, or use eval.window=fixed."
        )
    head = WindowHead(WindowHeadConfig(**json.loads((where / "config.json").read_text())))
    head.load_state_dict(load_file(where / "model.safetensors"))
    return head.eval()


@dataclass(frozen=True)
class StepCosts:
    """What a step costs, in seconds: verify[0] is a plain decoding step (the unit of the reward),
    verify[n] (n = 1..K) the target's forward of the pending token and n drafts, and drafting costs
    draft_fixed once per step (e.g. EAGLE-3 feeding the accepted tokens) plus draft_per_token per
    draft. Measured on the machine by `specdec.eval.calibrate` (or set in a recipe for another
    device)."""

    verify: tuple[float, ...]
    draft_per_token: float
    draft_fixed: float = 0.0
    source: str = ""  # how they were obtained, for the report

    def step(self, drafted: torch.Tensor) -> torch.Tensor:
        """Seconds of a step that drafts `drafted` tokens ([...] int64, 1..K)."""
        verify = torch.tensor(self.verify, dtype=torch.float64, device=drafted.device)[drafted]
        return verify + self.draft_fixed + drafted.double() * self.draft_per_token


def speedup_reward(accepted: torch.Tensor, drafted: torch.Tensor, costs: StepCosts) -> torch.Tensor:
    """Tokens emitted per second of a step, relative to plain decoding (one token per verify[0]):
    (accepted + 1) / cost(n) * verify[0]. Above 1 the step beat an autoregressive step."""
    if bool((drafted < 1).any()):
        raise ValueError("speedup_reward: a speculative step drafts at least one token")
    return (accepted.double() + 1) / costs.step(drafted) * costs.verify[0]
