"""The training stage behind `specdec-train`: the cache (built if missing), the drafter with its
draft vocabulary, Lightning's loop with the eval hook and checkpoints, and a final report that
measures the trained drafter and its untrained start against plain decoding, in one run.

    run.dir/config.yaml            the resolved recipe (written by the CLI)
    run.dir/cache/                 the hidden-state cache (offline mode)
    run.dir/logs/                  TensorBoard: train/*, eval/* (run.dir/logs/<run.log_version> when set, e.g.
                                   the Slurm job id: a requeued job continues its curve)
    run.dir/checkpoints/           last.ckpt (resumed by a rerun with the same run.dir) and best-*.ckpt (eval/tau);
                                   directories of shards under DeepSpeed
    run.dir/drafter/               the trained drafter (the last step, or an earlier one the hook measured better)
    run.dir/eval.json, eval.png    the final report (eval.out)
"""

import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from specdec.data_prep import (
    HiddenStateCache,
    Target,
    TargetConfig,
    cache_key,
    check_same_tokenizer,
    load_target,
    load_tokenizer,
    prepare_cache,
    training_samples,
)
from specdec.data_prep.cache import remove_dead_writers_files, temporary_path
from specdec.data_prep.prep import distributed_rank
from specdec.eval import Sampling, SpecConfig
from specdec.eval.calibrate import calibrate_costs
from specdec.eval.drafters.hybrid import HybridDrafter
from specdec.eval.drafters.ngram import NgramDrafter
from specdec.eval.evaluate import EvalReport, evaluate_drafters, write_reports
from specdec.eval.hook import SpecEvalCallback
from specdec.eval.prompts import PromptError, load_prompts
from specdec.eval.window import (
    LearnedWindow,
    WindowHead,
    WindowHeadConfig,
    has_window_head,
    load_window_head,
    save_window_head,
)
from specdec.trainer.config import RecipeError, SpecdecConfig
from specdec.trainer.data import CachedSamples, DrafterData, TokenSamples, steps_per_epoch
from specdec.trainer.drafters import DrafterKind, drafter_kind
from specdec.trainer.module import DrafterModule
from specdec.trainer.objectives import OBJECTIVES, WINDOW_POLICY_INPUTS
from specdec.trainer.objectives.window_rl import MeasuredCosts
from specdec.trainer.requeue import JobRequeued, RequeueOnSignal
from specdec.trainer.strategies import (
    GPU_ONLY,
    SHARDS_PARAMETERS,
    build_strategy,
    check_strategy,
    checkpoint_step,
    full_weights,
    read_checkpoint,
    wrap_classes,
)

log = logging.getLogger(__name__)

# DrafterData resumes by skipping the batches the restored step trained on (their order is a
# function of seed and epoch), so Lightning's warning about mid-epoch restarts does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


@dataclass(frozen=True)
class TrainResult:
    drafter_dir: Path
    reports: dict[str, EvalReport]  # "trained" and "untrained", against the same autoregressive baseline
    steps: int
    train_tokens: int  # real (unpadded) tokens the drafter saw
    train_seconds: float  # trainer.fit alone (this session's part, after a resume)
    is_global_zero: bool = True  # the rank that writes the report (and exports); the others print nothing


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary name and are renamed: a kill mid-save keeps the previous one,
    and the next run removes the killed writer's file (remove_dead_writers_files)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = temporary_path(path)
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def spec_config(cfg: SpecdecConfig) -> SpecConfig:
    return SpecConfig(
        k=cfg.eval.k,
        tree_width=cfg.eval.tree_width,
        tree_min_confidence=cfg.eval.tree_min_confidence,
        max_new_tokens=cfg.eval.max_new_tokens,
        sampling=Sampling(cfg.eval.temperature, cfg.eval.top_p),
    )


def eos_token_ids(target: Target) -> set[int]:
    configured = target.model.generation_config.eos_token_id
    ids = {target.tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    return {i for i in ids if i is not None}


def needs_teacher(cfg: SpecdecConfig, kind: DrafterKind) -> bool:
    """Whether an objective of the recipe takes an input the drafter kind computes from the target's
    final normed state (PARD-1's cross entropy takes none: it trains on the data's tokens alone)."""
    return any(set(OBJECTIVES[name].inputs) & kind.teacher_inputs for name in cfg.objective)


def target_layers(cfg: SpecdecConfig, target: Target) -> tuple[list[int], tuple[int, ...]]:
    """(the target layers cached or computed online, the drafter's features among them): the layers
    the drafter reads (cache.layers, or the drafter's default), then the final normed state N when an
    objective needs the teacher, unless the drafter's last feature is N already (the CTC drafter
    reads N alone). Empty when neither: the drafter trains on token ids alone, with no cache and no
    target forward."""
    num_layers = target.model.config.num_hidden_layers
    teacher = needs_teacher(cfg, drafter_kind(cfg.draft.name))
    reads_final = cfg.draft.target_layers(num_layers)[-1:] == [num_layers]
    layers = list(cfg.cache.layers or cfg.draft.target_layers(num_layers))
    if teacher and not cfg.cache.layers and not reads_final:
        return [*layers, num_layers], tuple(layers)
    if teacher and layers[-1] != num_layers:
        raise RecipeError(
            f"cache.layers={layers}: the last id must be {num_layers}, the target's final normed state, from "
            f"which the teacher's distribution is computed (e.g. cache.layers=[...,{num_layers}])."
        )
    return layers, tuple(layers[:-1] if teacher and not reads_final else layers)


def training_set(cfg: SpecdecConfig, target: Target, layers: list[int], progress: bool):
    """CachedSamples (offline: the cache, built first if it is missing) or TokenSamples (online, or
    when no target layer is needed)."""
    key = cache_key(target, cfg.target, cfg.data, cfg.cache, layers=layers, seed=cfg.run.seed)
    if cfg.cache.online or not layers:
        samples, _, _ = training_samples(
            target, cfg.data, key=key, work_dir=Path(cfg.cache.dir), seed=cfg.run.seed, progress=progress
        )
        return TokenSamples(samples)
    manifest = Path(cfg.cache.dir) / "manifest.json"
    if not manifest.is_file():
        rank, world = distributed_rank()  # srun or torchrun tasks; Lightning's own launcher starts its ranks later
        log.info("no cache in %s: building it first, as specdec-prep does (rank %d of %d)", cfg.cache.dir, rank, world)
        prepare_cache(
            target, target_cfg=cfg.target, data_cfg=cfg.data, cache_cfg=cfg.cache, layers=layers, seed=cfg.run.seed
        )
        # each rank wrote its share of the shards; the last to finish writes the manifest (a rank that
        # fails ends the job: srun --kill-on-bad-exit, torchrun's agent)
        waiting = time.monotonic()
        while not manifest.is_file():
            if time.monotonic() - waiting > 60:
                log.info("rank %d: waiting for the other ranks to finish the cache (%s)", rank, manifest)
                waiting = time.monotonic()
            time.sleep(1)
    return CachedSamples(HiddenStateCache(cfg.cache.dir, expected_key=key))


def draft_from_checkpoint(
    cfg: SpecdecConfig, kind: DrafterKind, target: Target, state: dict, source: Path
) -> torch.nn.Module:
    """This recipe's drafter built afresh (its shape) with every trained tensor from a checkpoint's state."""
    draft = kind.build(cfg.draft, target, [], cfg.run.seed)
    own = {key.removeprefix("draft."): value for key, value in state["state_dict"].items() if key.startswith("draft.")}
    missing, unexpected = draft.load_state_dict(own, strict=False)
    missing = [key for key in missing if key not in kind.shared_keys(draft)]
    if missing or unexpected:
        raise RecipeError(
            f"{source}: not a checkpoint of this recipe's drafter (draft.name={cfg.draft.name}; missing "
            f"{missing[:4]}, unexpected {unexpected[:4]}). Give the recipe the run was trained with."
        )
    return draft


def window_head(cfg: SpecdecConfig, target: Target, draft: nn.Module) -> WindowHead | None:
    """The window policy's head when an objective trains it: the one saved beside draft.start (a
    supervised start for RL), else a fresh one with objective.stop_head's threshold, reading the
    drafter's hidden state (the target's size for EAGLE-3, the draft model's for PARD)."""
    if not any(set(OBJECTIVES[name].inputs) & WINDOW_POLICY_INPUTS for name in cfg.objective):
        return None
    start = getattr(cfg.draft, "start", None)
    if start is not None and has_window_head(start):
        log.info("window head from %s", start)
        return load_window_head(start).train()
    threshold = cfg.objective["stop_head"].threshold if "stop_head" in cfg.objective else 0.5
    torch.manual_seed(cfg.run.seed)
    hidden_size = getattr(getattr(draft, "config", None), "hidden_size", target.model.config.hidden_size)
    config = WindowHeadConfig(hidden_size=hidden_size, threshold=threshold)
    return WindowHead(config)


# lookup drafts cost nothing and are long where they match: the baseline drafts up to 8 (transformers' 10)
NGRAM_K = 8


def ngram_drafter(cfg: SpecdecConfig, target: Target, eos: set[int]) -> NgramDrafter:
    """The zero-training baseline: prompt lookup over eval.ngram-grams."""
    vocab_size = target.model.get_output_embeddings().weight.shape[0]
    return NgramDrafter(vocab_size, max_ngram=cfg.eval.ngram, eos_token_ids=eos)


def draft_steps(cfg: SpecdecConfig) -> int:
    """The draft tokens per chain a recipe trains: EAGLE-3's unrolled steps, PARD's blocks."""
    return getattr(cfg.draft, "unroll_steps", None) or getattr(cfg.draft, "k", None) or cfg.eval.k


def measured_costs(run_dir: Path, target: Target, session, prompts, cfg: SpecdecConfig, eos: set[int]) -> MeasuredCosts:
    """What a verify step costs on this machine (specdec.eval.calibrate), recorded in
    run.dir/window_costs.json; a resumed run reads them back, so its reward stays the same."""
    path = run_dir / "window_costs.json"
    max_k = max(cfg.eval.k, draft_steps(cfg))
    if path.is_file():
        recorded = MeasuredCosts(**{k: v for k, v in json.loads(path.read_text()).items() if k != "source"})
        if len(recorded.verify) < max_k + 1:
            raise ValueError(
                f"{path}: the recorded step costs cover windows up to {len(recorded.verify) - 1} tokens, and this "
                f"run drafts up to {max_k} (eval.k, draft.unroll_steps or draft.k). Delete the file to measure them "
                "again (the reward changes, so start the RL run over), or keep the run's K."
            )
        return recorded
    costs = calibrate_costs(
        target.model, session, [prompt.token_ids for prompt in prompts[:4]], max_k=max_k, eos_token_ids=eos
    )
    if distributed_rank()[0] == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(costs), indent=1) + "\n")
    log.info(
        "step costs (%s): verify %s s, draft %.4f + %.4f n s",
        costs.source,
        [round(v, 4) for v in costs.verify],
        costs.draft_fixed,
        costs.draft_per_token,
    )
    return MeasuredCosts(list(costs.verify), costs.draft_per_token, costs.draft_fixed)


def leave_process_group(trainer: L.Trainer) -> None:
    """Every rank leaves together: a rank that exits while the others still use the process group
    aborts in gloo's teardown ("terminate called without an active exception"), a failed task to srun."""
    if torch.distributed.is_initialized():
        trainer.strategy.barrier("leaving")
        torch.distributed.destroy_process_group()


def resume_checkpoint(last: Path) -> Path | None:
    """`last` (last.ckpt), after removing what a writer killed mid-save left beside it; None on a first run."""
    if last.parent.is_dir():
        for path in remove_dead_writers_files(last.parent):
            log.info("removed %s, left by a run killed while saving", path)
    return last if last.exists() else None


def train(
    cfg: SpecdecConfig, *, callbacks: list[L.Callback] = (), progress: bool = True, report: bool = True
) -> TrainResult:
    """Train, save the drafter, and (if `report`) measure it against its untrained start. Under Slurm
    a requeue signal ends the run early with JobRequeued (the job's next start resumes)."""
    run_dir = Path(cfg.run.dir)
    check_strategy(cfg.trainer.strategy, cfg.trainer.accelerator)
    L.seed_everything(cfg.run.seed, verbose=False)
    target = load_target(cfg.target, seed=cfg.run.seed)
    draft_init = getattr(cfg.draft, "init", None)
    if draft_init is not None:
        draft_tokenizer = load_tokenizer(TargetConfig(path=draft_init), key="draft.init")
        check_same_tokenizer(target.tokenizer, draft_tokenizer, target_name=cfg.target.path, draft_name=draft_init)
    kind = drafter_kind(cfg.draft.name)
    if cfg.eval.ngram_first and not getattr(kind.session, "can_sit_out", False):
        raise RecipeError(
            f"eval.ngram_first: the hybrid serves EAGLE-3 and CTC drafters (they can sit out a lookup step); "
            f"draft.name={cfg.draft.name} drafts every step. Drop eval.ngram_first."
        )
    layers, feature_layers = target_layers(cfg, target)
    dataset = training_set(cfg, target, layers, progress)
    draft = kind.build(cfg.draft, target, dataset.token_samples(), cfg.run.seed)
    untrained = kind.serving_copy(draft, target.model.dtype)  # its start, kept before any step changes it
    online = cfg.cache.online and bool(layers)
    shards = cfg.trainer.strategy in SHARDS_PARAMETERS
    window = window_head(cfg, target, draft)
    module = DrafterModule(
        draft,
        kind=kind,
        draft_cfg=cfg.draft,
        objectives=cfg.objective,
        optim=cfg.optim,
        lm_head=target.model.get_output_embeddings().weight,
        target=target.model if online else None,
        layers=layers,
        shard_target=shards,
        eval_k=cfg.eval.k,
        window=window,
    )

    prompts = load_prompts(
        cfg.eval.bench,
        target.tokenizer,
        num_prompts=cfg.eval.num_prompts + cfg.eval.hook_num_prompts,
        chat_template=cfg.data.chat_template,
    )
    if len(prompts) <= cfg.eval.num_prompts:
        raise PromptError(
            f"eval.bench={cfg.eval.bench} has {len(prompts)} prompts: the report takes eval.num_prompts="
            f"{cfg.eval.num_prompts} and the training hook needs more, held out from those; lower eval.num_prompts."
        )
    report_prompts, hook_prompts = prompts[: cfg.eval.num_prompts], prompts[cfg.eval.num_prompts :]
    spec, eos = spec_config(cfg), eos_token_ids(target)
    if "window_rl" in cfg.objective and cfg.objective["window_rl"].costs is None:
        session = kind.session(kind.serving_copy(draft, target.model.dtype), feature_layers)
        cfg.objective["window_rl"].costs = measured_costs(run_dir, target, session, hook_prompts, cfg, eos)
    hook = SpecEvalCallback(
        target=target.model,
        prompts=hook_prompts,
        make_drafter=lambda module: kind.session(kind.serving_copy(module.draft, target.model.dtype), feature_layers),
        cfg=spec,
        eos_token_ids=eos,
        every_n_steps=cfg.eval.every_n_steps,
        batch_size=cfg.eval.batch_size,
        seed=cfg.run.seed,
        full_weights=full_weights,
    )
    checkpoints = run_dir / "checkpoints"
    last = ModelCheckpoint(
        dirpath=checkpoints, save_last=True, save_top_k=0, every_n_train_steps=cfg.run.checkpoint_every_n_steps
    )
    best = ModelCheckpoint(
        dirpath=checkpoints,
        filename="best-{step}",
        monitor="eval/tau",
        mode="max",
        save_top_k=1,
        every_n_train_steps=cfg.eval.every_n_steps,
    )
    last_checkpoint = checkpoints / "last.ckpt"
    resume = resume_checkpoint(last_checkpoint)
    # Under Slurm (srun tasks): ranks from SLURMEnvironment, and our requeue handler in place of its own
    slurm = SLURMEnvironment.detect()
    requeue = RequeueOnSignal(last_checkpoint) if slurm else None
    # A rerun from an earlier step than the logs reached (a kill between checkpoints) hides the
    # logged steps after it: TensorBoard purges them at purge_step, so the curve stays one line.
    logger = TensorBoardLogger(
        save_dir=run_dir / "logs" if cfg.run.log_version else run_dir,
        name="",
        version=cfg.run.log_version or "logs",
        default_hp_metric=False,
        purge_step=checkpoint_step(resume) if resume else None,
    )
    strategy = build_strategy(cfg.trainer.strategy, wrap=wrap_classes(target.model, draft))
    trainer = L.Trainer(
        **{**vars(cfg.trainer), "strategy": strategy},
        default_root_dir=run_dir,
        logger=logger,
        callbacks=[hook, last, best, *([requeue] if requeue else []), *callbacks],
        plugins=[AtomicCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if slurm else [])],
        use_distributed_sampler=False,  # DrafterData shards its batches by rank
        num_sanity_val_steps=0,
        enable_progress_bar=progress,
    )
    data = DrafterData(dataset, batch_size=cfg.data.batch_size, seed=cfg.run.seed)
    if cfg.trainer.max_steps == -1 and cfg.trainer.max_epochs:
        # Epochs as steps: Lightning's epoch count can come back one too high after a restart (data.py).
        per_epoch = steps_per_epoch(
            len(dataset), cfg.data.batch_size, world=trainer.world_size, accumulate=trainer.accumulate_grad_batches
        )
        trainer.fit_loop.epoch_loop.max_steps = cfg.trainer.max_epochs * per_epoch
        trainer.fit_loop.max_epochs = -1
    if resume:
        log.info("resuming from %s", resume)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    train_seconds = time.perf_counter() - start
    if requeue is not None and requeue.saved_at is not None:
        leave_process_group(trainer)
        if trainer.is_global_zero:
            requeue.requeue_job()
        raise JobRequeued(f"saved {requeue.checkpoint} at step {requeue.saved_at} for the requeued job")
    # ModelCheckpoint writes every n steps only: last.ckpt holds the final step too (the same file
    # again when the last step was one of them)
    trainer.save_checkpoint(last_checkpoint, weights_only=False)

    train_tokens = int(module.tokens_seen.item())
    final_tau = trainer.callback_metrics.get("eval/tau")  # the hook measures the last step too
    from_best = bool(best.best_model_path) and (final_tau is None or best.best_model_score > final_tau)
    chosen = Path(best.best_model_path) if from_best else last_checkpoint
    drafter_dir = run_dir / "drafter"
    if trainer.is_global_zero:
        if cfg.trainer.strategy in GPU_ONLY:
            # under FSDP and DeepSpeed the module holds a shard (or ZeRO-1/2's bf16 copy): read the checkpoint
            final_draft = draft_from_checkpoint(cfg, kind, target, read_checkpoint(chosen), chosen)
        else:
            if from_best:  # the module holds whole tensors: load the kept step into it
                state = torch.load(chosen, map_location="cpu", weights_only=True)
                module.on_load_checkpoint(state)
                module.load_state_dict(state["state_dict"])
            final_draft = module.draft
        if from_best:
            log.info("drafter from %s (eval/tau %.3f)", chosen, best.best_model_score)
        kind.save(final_draft, drafter_dir, target.model.config, feature_layers)
        if module.window is not None:
            save_window_head(module.window, drafter_dir)
    trainer.strategy.barrier("drafter saved")
    trained, _ = kind.load(drafter_dir, target.model)
    trained, untrained = trained.to(target.model.device), untrained.to(target.model.device)  # the hook's device
    sessions = {"trained": kind.session(trained, feature_layers)}
    measured = {"trained": {}}
    if module.window is not None:  # served with its window policy ...
        sessions["trained"].window = LearnedWindow(load_window_head(drafter_dir).to(target.model.device))
        measured["trained"]["window"] = "policy"
    if cfg.eval.ngram_first:  # ... and/or after n-gram lookup (the hybrid) ...
        sessions["trained"] = HybridDrafter(ngram_drafter(cfg, target, eos), sessions["trained"], trained_k=cfg.eval.k)
        measured["trained"]["mode"] = "ngram_first"
    if module.window is not None or cfg.eval.ngram_first:  # ... beside the same drafter alone at fixed K
        sessions["trained, fixed K"] = kind.session(trained, feature_layers)
    if not module.frozen_draft:
        sessions["untrained"] = kind.session(untrained, feature_layers)
        measured["untrained"] = {"untrained": True}
    reports = {}
    if report:
        benches = {cfg.eval.bench: report_prompts} | {
            bench: load_prompts(
                bench, target.tokenizer, num_prompts=cfg.eval.num_prompts, chat_template=cfg.data.chat_template
            )
            for bench in cfg.eval.extra_benches
        }
        for bench, bench_prompts in benches.items():
            rows = sessions if bench == cfg.eval.bench else {"trained": sessions["trained"]}
            configs, lookup_spec = {}, replace(spec, k=max(spec.k, NGRAM_K), tree_width=1)
            if cfg.eval.ngram_first:  # lookup drafts as far as the n-gram row does, the drafter up to eval.k
                configs["trained"] = lookup_spec
            if cfg.eval.ngram:
                rows = rows | {"ngram": ngram_drafter(cfg, target, eos)}
                configs["ngram"] = lookup_spec
            with full_weights(trainer, module):  # every rank decodes its share of the prompts
                measured_bench = evaluate_drafters(
                    target.model,
                    rows,
                    bench_prompts,
                    cfg=spec,
                    configs=configs,
                    eos_token_ids=eos,
                    batch_size=cfg.eval.batch_size,
                    seed=cfg.run.seed,
                    progress=progress,
                    bench=bench,
                )
            suffix = "" if bench == cfg.eval.bench else f" ({bench})"
            reports |= {
                name + suffix: replace(
                    report, drafter="ngram" if name == "ngram" else str(drafter_dir), **measured.get(name, {})
                )
                for name, report in measured_bench.items()
            }
        if trainer.is_global_zero:
            write_reports(reports, Path(cfg.eval.out), title=f"{cfg.eval.bench}, k={cfg.eval.k}")
        else:
            reports = {}  # one rank writes, and exports
    leave_process_group(trainer)
    return TrainResult(drafter_dir, reports, trainer.global_step, train_tokens, train_seconds, trainer.is_global_zero)
