"""Measure a drafter the way it will serve: the engine decodes held-out prompts with and without
it, in one run, and reports tau, acceptance per position, tokens/s and the speedup over plain
autoregressive decoding of the same target on the same prompts, and where the time goes (drafting
vs verifying, per verify step and in total). Several drafters (a trained one and its untrained
start, or the rows of `eval.compare`, each at its own draft length) share that baseline. Greedy runs
also check that every output equals the target's own greedy decode (the autoregressive run).

With several ranks (torch.distributed initialized, as under `specdec-train` with DDP, FSDP or
DeepSpeed, or `srun` of several tasks), each rank decodes its share of the prompts and every rank
gets the one report of them all: tokens/s is per replica (all tokens over the summed decode time),
so it compares with a one-process run of the same prompts."""

import json
import platform
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from specdec.eval.drafters import Drafter
from specdec.eval.engine import Generation, SpecConfig, generate
from specdec.eval.metrics import acceptance_stats, plot_acceptance
from specdec.eval.prompts import Prompt


@dataclass(frozen=True)
class EvalReport:
    tau: float
    accept_rate: float
    accept_rate_per_pos: list[float]
    tokens_per_s: float
    ar_tokens_per_s: float
    speedup: float
    num_prompts: int
    new_tokens: int
    verify_steps: int  # per row: a batch of B rows makes B at each target forward
    drafted_per_step: float  # tokens drafted per row and verify step: K for a full chain, N for a tree
    draft_ms_per_step: float  # per verify step of a batch (one target forward): propose and commit
    verify_ms_per_step: float  # target forward, verification and KV rollback
    draft_ms_total: float
    verify_ms_total: float
    k: int
    tree_width: int
    temperature: float
    greedy_matches_target: float | None  # share of outputs equal to the target's greedy decode; None if sampled
    device: str
    max_new_tokens: int
    target_dtype: str  # e.g. "torch.bfloat16": the target as measured, drafter and baseline alike
    bench: str = ""  # where the prompts came from (eval.bench)
    date: str = ""  # UTC day of the measurement, ISO 8601
    # what was measured, for readers of the JSON such as the model card: the drafter's directory (or
    # Hub id), whether its untrained start stood in for it, and its serving mode (None = its default)
    drafter: str | None = None
    untrained: bool = False
    mode: str | None = None
    # the window: fixed (k tokens every step) or policy (the learned stop policy drafts up to k), and
    # what the run measured: how many steps drafted n = 0, 1, ... tokens, and the cost of a step by n
    # (the cost model of the window policy, measured in this run; empty when rows were batched)
    window: str = "fixed"
    drafted_histogram: list[int] = field(default_factory=list)
    verify_ms_by_drafted: dict[int, float] = field(default_factory=dict)
    draft_ms_by_drafted: dict[int, float] = field(default_factory=dict)
    tree_min_confidence: float = 0.0  # a dynamic tree's threshold (EAGLE-2); 0 = the whole k x tree_width tree


def write_reports(reports: dict[str, EvalReport], path: Path, title: str) -> None:
    """The JSON report at `path` ({drafter name: report}) and the acceptance plot beside it (.png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: asdict(report) for name, report in reports.items()}, indent=1) + "\n")
    series = {f"{name} (tau {report.tau:.2f})": report.accept_rate_per_pos for name, report in reports.items()}
    plot_acceptance(series, path.with_suffix(".png"), title)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _concat(results: list[Generation]) -> Generation:
    return Generation(
        new_tokens=[tokens for result in results for tokens in result.new_tokens],
        accepted=[steps for result in results for steps in result.accepted],
        drafted=[steps for result in results for steps in result.drafted],
        draft_time_s=[time_s for result in results for time_s in result.draft_time_s],
        verify_time_s=[time_s for result in results for time_s in result.verify_time_s],
        seconds=sum(result.seconds for result in results),
    )


def decode_prompts(
    target: PreTrainedModel,
    prompts: list[Prompt],
    *,
    drafter: Drafter | None,
    cfg: SpecConfig,
    eos_token_ids: set[int],
    batch_size: int,
    seed: int,
    desc: str,
    progress: bool,
) -> Generation:
    """The prompts decoded `batch_size` at a time, as they are served; one Generation for all, in the
    order of the ranks' shares when there are several ranks (prompts rank, rank + world, ...)."""
    rank, world = rank_and_world()
    own = prompts[rank::world]
    results = []
    generator = torch.Generator(device=target.device).manual_seed(seed + rank)
    for start in tqdm(range(0, len(own), batch_size), desc=desc, unit="batch", disable=not progress or rank > 0):
        batch = [prompt.token_ids for prompt in own[start : start + batch_size]]
        results.append(
            generate(target, batch, drafter=drafter, cfg=cfg, eos_token_ids=eos_token_ids, generator=generator)
        )
    if world == 1:
        return _concat(results)
    shares = [None] * world
    dist.all_gather_object(shares, _concat(results))
    return _concat(shares)


def _report(spec: Generation, baseline: Generation, cfg: SpecConfig, device: str, bench: str, dtype: str) -> EvalReport:
    """One drafter's run `spec`, decoded at `cfg`, against the autoregressive `baseline` on the same prompts."""
    stats = acceptance_stats([n for row in spec.accepted for n in row], cfg.k)
    matches = None
    if cfg.sampling.greedy:
        pairs = zip(spec.new_tokens, baseline.new_tokens, strict=True)
        matches = sum(a == b for a, b in pairs) / len(spec.new_tokens)
    tokens_per_s = spec.num_new_tokens / spec.seconds
    ar_tokens_per_s = baseline.num_new_tokens / baseline.seconds
    drafted = [n for row in spec.drafted for n in row]
    draft_ms, verify_ms = 1000 * sum(spec.draft_time_s), 1000 * sum(spec.verify_time_s)
    histogram = [drafted.count(n) for n in range(max(drafted, default=0) + 1)]
    by_drafted = {}, {}
    if len(drafted) == len(spec.verify_time_s):  # one row per step (batch_size 1): each step's own n
        for times, out in zip((spec.verify_time_s, spec.draft_time_s), by_drafted, strict=True):
            for n in range(len(histogram)):
                seconds = [time_s for time_s, count in zip(times, drafted, strict=True) if count == n]
                if seconds:
                    out[n] = 1000 * sum(seconds) / len(seconds)
    return EvalReport(
        tau=stats.tau,
        accept_rate=stats.accept_rate,
        accept_rate_per_pos=stats.accept_rate_per_pos,
        tokens_per_s=tokens_per_s,
        ar_tokens_per_s=ar_tokens_per_s,
        speedup=tokens_per_s / ar_tokens_per_s,
        num_prompts=len(spec.new_tokens),
        new_tokens=spec.num_new_tokens,
        verify_steps=stats.verify_steps,
        drafted_per_step=sum(drafted) / len(drafted),
        draft_ms_per_step=draft_ms / len(spec.draft_time_s),
        verify_ms_per_step=verify_ms / len(spec.verify_time_s),
        draft_ms_total=draft_ms,
        verify_ms_total=verify_ms,
        k=cfg.k,
        tree_width=cfg.tree_width,
        tree_min_confidence=cfg.tree_min_confidence,
        temperature=cfg.sampling.temperature,
        greedy_matches_target=matches,
        device=device,
        max_new_tokens=cfg.max_new_tokens,
        target_dtype=dtype,
        bench=bench,
        date=datetime.now(timezone.utc).date().isoformat(),
        drafted_histogram=histogram,
        verify_ms_by_drafted=by_drafted[0],
        draft_ms_by_drafted=by_drafted[1],
    )


def evaluate_drafters(
    target: PreTrainedModel,
    drafters: dict[str, Drafter],
    prompts: list[Prompt],
    *,
    cfg: SpecConfig,
    configs: dict[str, SpecConfig] | None = None,
    eos_token_ids: set[int],
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
    bench: str = "",
) -> dict[str, EvalReport]:
    """One run: warm-up, the autoregressive baseline (decoded once, at `cfg`), then speculative
    decoding with each drafter at its own config in `configs` (k and tree_width may differ from
    `cfg`; max_new_tokens and sampling may not, since every drafter is compared with that one
    baseline), or at `cfg` for a drafter not in `configs`. `bench` names the prompts' source in the
    reports."""
    configs = configs or {}
    problems = [f"configs[{name!r}]: no such drafter" for name in configs if name not in drafters]
    problems += [
        f"configs[{name!r}]: max_new_tokens={own.max_new_tokens} and {own.sampling}, but cfg has "
        f"max_new_tokens={cfg.max_new_tokens} and {cfg.sampling}, which every drafter shares with the baseline"
        for name, own in configs.items()
        if (own.max_new_tokens, own.sampling) != (cfg.max_new_tokens, cfg.sampling)
    ]
    if problems:
        raise ValueError("; ".join(problems))
    configs = {name: configs.get(name, cfg) for name in drafters}
    common = {"eos_token_ids": eos_token_ids, "batch_size": batch_size, "seed": seed, "progress": progress}
    for name, drafter in drafters.items():
        warm = replace(configs[name], max_new_tokens=4)
        generate(target, [prompts[0].token_ids], drafter=drafter, cfg=warm, eos_token_ids=eos_token_ids)
    baseline = decode_prompts(target, prompts, drafter=None, cfg=cfg, desc="autoregressive", **common)
    device = device_name(target.device)
    reports = {}
    for name, drafter in drafters.items():
        spec = decode_prompts(
            target, prompts, drafter=drafter, cfg=configs[name], desc=f"speculative, {name}", **common
        )
        reports[name] = _report(spec, baseline, configs[name], device, bench, str(target.dtype))
    return reports


def evaluate_drafter(target: PreTrainedModel, drafter: Drafter, prompts: list[Prompt], **kwargs) -> EvalReport:
    """`evaluate_drafters` with one drafter."""
    return evaluate_drafters(target, {"drafter": drafter}, prompts, **kwargs)["drafter"]
