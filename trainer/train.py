"""The training stage behind `specdec-train`: the cache (built if missing), the drafter with its
draft vocabulary, Lightning's loop with the eval hook and checkpoints, and a final report that
measures the trained drafter and its untrained start against plain decoding, in one run.

    run.dir/config.yaml            the resolved recipe (written by the CLI)
    run.dir/cache/                 the hidden-state cache (offline mode)
    run.dir/logs/                  TensorBoard: train/*, eval/*
    run.dir/checkpoints/           last.ckpt (resumed by a rerun with the same run.dir) and best-*.ckpt (eval/tau)
    run.dir/drafter/               the trained drafter (the last step, or an earlier one the hook measured better)
    run.dir/eval.json, eval.png    the final report (eval.out)
"""

import copy
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import PreTrainedModel

from specdec.data_prep import (
    CacheError,
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
from specdec.data_prep.prep import distributed_rank
from specdec.eval import Sampling, SpecConfig
from specdec.eval.drafters.eagle3 import Eagle3Drafter, Eagle3Model, load_eagle3, save_eagle3
from specdec.eval.evaluate import EvalReport, evaluate_drafters, write_reports
from specdec.eval.hook import SpecEvalCallback
from specdec.eval.prompts import PromptError, load_prompts
from specdec.trainer.config import RecipeError, SpecdecConfig
from specdec.trainer.data import CachedSamples, DrafterData, TokenSamples
from specdec.trainer.draft_vocab import count_loss_tokens, draft_vocab
from specdec.trainer.module import DrafterModule

log = logging.getLogger(__name__)

# DrafterData resumes by skipping the batches the restored step trained on (their order is a
# function of seed and epoch), so Lightning's warning about mid-epoch restarts does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

# Issues that bring the other drafters (DESIGN.md); the schema already knows their fields.
_COMING = {"pard": 6, "ctc": 7}


@dataclass(frozen=True)
class TrainResult:
    drafter_dir: Path
    reports: dict[str, EvalReport]  # "trained" and "untrained", against the same autoregressive baseline
    steps: int
    train_tokens: int  # real (unpadded) tokens the drafter saw
    train_seconds: float  # trainer.fit alone (this session's part, after a resume)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary name and are renamed: a kill mid-save keeps the previous one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def spec_config(cfg: SpecdecConfig) -> SpecConfig:
    return SpecConfig(
        k=cfg.eval.k,
        tree_width=cfg.eval.tree_width,
        max_new_tokens=cfg.eval.max_new_tokens,
        sampling=Sampling(cfg.eval.temperature, cfg.eval.top_p),
    )


def eos_token_ids(target: Target) -> set[int]:
    configured = target.model.generation_config.eos_token_id
    ids = {target.tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    return {i for i in ids if i is not None}


def target_layers(cfg: SpecdecConfig, target: Target) -> list[int]:
    """The cached layers: the drafter's features, then the final normed state for the teacher."""
    num_layers = target.model.config.num_hidden_layers
    layers = list(cfg.cache.layers or cfg.draft.target_layers(num_layers))
    if layers[-1] != num_layers:
        raise RecipeError(
            f"cache.layers={layers}: the last id must be {num_layers}, the target's final normed state, from "
            f"which the teacher's distribution is computed (e.g. cache.layers=[...,{num_layers}])."
        )
    return layers


def training_set(cfg: SpecdecConfig, target: Target, layers: list[int], progress: bool):
    """CachedSamples (offline: the cache, built first if it is missing) or TokenSamples (online)."""
    key = cache_key(target, cfg.target, cfg.data, cfg.cache, layers=layers, seed=cfg.run.seed)
    if cfg.cache.online:
        samples, _, _ = training_samples(
            target, cfg.data, key=key, work_dir=Path(cfg.cache.dir), seed=cfg.run.seed, progress=progress
        )
        return TokenSamples(samples)
    if not (Path(cfg.cache.dir) / "manifest.json").is_file():
        if distributed_rank()[1] > 1:
            raise CacheError(
                f"cache.dir={cfg.cache.dir} has no finished cache; with several ranks build it first with "
                "`specdec-prep` and the same recipe (or train with cache.online=true)."
            )
        log.info("no cache in %s: building it first (specdec-prep does the same)", cfg.cache.dir)
        prepare_cache(
            target, target_cfg=cfg.target, data_cfg=cfg.data, cache_cfg=cfg.cache, layers=layers, seed=cfg.run.seed
        )
    return CachedSamples(HiddenStateCache(cfg.cache.dir, expected_key=key))


def build_draft(cfg: SpecdecConfig, target: Target, dataset) -> Eagle3Model:
    counts = count_loss_tokens(dataset.token_samples(), target.model.config.vocab_size)
    d2t, t2d = draft_vocab(counts, cfg.draft.vocab_size)
    share = counts[t2d].sum().item() / max(counts.sum().item(), 1)
    log.info("draft vocabulary: %d tokens cover %.1f%% of the loss tokens", len(d2t), 100 * share)
    return new_eagle3(target.model, d2t, t2d, seed=cfg.run.seed)


def new_eagle3(target: PreTrainedModel, d2t: torch.Tensor, t2d: torch.Tensor, *, seed: int) -> Eagle3Model:
    """A freshly initialised float32 EAGLE-3 drafter over a draft vocabulary; the same for the same seed."""
    L.seed_everything(seed, verbose=False)
    draft = Eagle3Model(target.config, draft_vocab_size=len(d2t), embed_tokens=target.get_input_embeddings())
    draft.d2t.copy_(d2t)
    draft.t2d.copy_(t2d)
    return draft  # float32 (the default dtype); the shared embedding stays in the target's dtype


def untrained_like(draft: Eagle3Model, target: PreTrainedModel, *, seed: int) -> Eagle3Model:
    """The start of a drafter trained with `seed` (same vocabulary, same init), in the target's dtype:
    the baseline every report measures beside the trained drafter."""
    return new_eagle3(target, draft.d2t, draft.t2d, seed=seed).to(target.dtype).eval()


def serving_copy(draft: Eagle3Model, dtype: torch.dtype) -> Eagle3Model:
    """The drafter as it is served (in `dtype`, eval mode), sharing the target's embedding, which
    stays as it is: what the hook measures while the module keeps its float32 weights."""
    served = copy.deepcopy(draft, memo={id(draft.embed_tokens): draft.embed_tokens})
    for child in served.children():
        if child is not draft.embed_tokens:
            child.to(dtype)
    return served.eval()


def train(
    cfg: SpecdecConfig, *, callbacks: list[L.Callback] = (), progress: bool = True, report: bool = True
) -> TrainResult:
    """Train, save the drafter, and (if `report`) measure it against its untrained start."""
    run_dir = Path(cfg.run.dir)
    L.seed_everything(cfg.run.seed, verbose=False)
    target = load_target(cfg.target, seed=cfg.run.seed)
    draft_init = getattr(cfg.draft, "init", None)
    if draft_init is not None:
        draft_tokenizer = load_tokenizer(TargetConfig(path=draft_init), key="draft.init")
        check_same_tokenizer(target.tokenizer, draft_tokenizer, target_name=cfg.target.path, draft_name=draft_init)
    if cfg.draft.name in _COMING:
        raise RecipeError(
            f"draft.name={cfg.draft.name}: training this drafter is not built yet (issue #{_COMING[cfg.draft.name]}); "
            "draft.name=eagle3 is."
        )
    layers = target_layers(cfg, target)
    dataset = training_set(cfg, target, layers, progress)
    draft = build_draft(cfg, target, dataset)
    untrained = untrained_like(draft, target.model, seed=cfg.run.seed)
    # unrolled draft steps: the training-time test's own count, else the chain length served
    steps = cfg.objective["ttt"].steps if "ttt" in cfg.objective else cfg.eval.k
    module = DrafterModule(
        draft,
        objectives=cfg.objective,
        optim=cfg.optim,
        steps=steps,
        lm_head=target.model.get_output_embeddings().weight,
        target=target.model if cfg.cache.online else None,
        layers=layers,
        eval_k=cfg.eval.k,
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
    feature_layers = tuple(layers[:-1])
    hook = SpecEvalCallback(
        target=target.model,
        prompts=hook_prompts,
        make_drafter=lambda module: Eagle3Drafter(serving_copy(module.draft, target.model.dtype), feature_layers),
        cfg=spec,
        eos_token_ids=eos,
        every_n_steps=cfg.eval.every_n_steps,
        batch_size=cfg.eval.batch_size,
        seed=cfg.run.seed,
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
    trainer = L.Trainer(
        **vars(cfg.trainer),
        default_root_dir=run_dir,
        logger=TensorBoardLogger(save_dir=run_dir, name="", version="logs", default_hp_metric=False),
        callbacks=[hook, last, best, *callbacks],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # DrafterData shards its batches by rank
        num_sanity_val_steps=0,
        enable_progress_bar=progress,
    )
    data = DrafterData(dataset, batch_size=cfg.data.batch_size, seed=cfg.run.seed)
    resume = checkpoints / "last.ckpt"
    if resume.is_file():
        log.info("resuming from %s", resume)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume if resume.is_file() else None)
    train_seconds = time.perf_counter() - start

    train_tokens = int(module.tokens_seen.item())
    final_tau = trainer.callback_metrics.get("eval/tau")  # the hook measures the last step too
    if best.best_model_path and (final_tau is None or best.best_model_score > final_tau):
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
        module.on_load_checkpoint(state)
        module.load_state_dict(state["state_dict"])
        log.info("drafter from %s (eval/tau %.3f)", best.best_model_path, best.best_model_score)
    drafter_dir = save_eagle3(
        module.draft, run_dir / "drafter", target_config=target.model.config, target_layers=feature_layers
    )
    trained, _ = load_eagle3(drafter_dir, target.model)
    reports = {}
    if report and trainer.is_global_zero:
        reports = evaluate_drafters(
            target.model,
            {"trained": Eagle3Drafter(trained, feature_layers), "untrained": Eagle3Drafter(untrained, feature_layers)},
            report_prompts,
            cfg=spec,
            eos_token_ids=eos,
            batch_size=cfg.eval.batch_size,
            seed=cfg.run.seed,
            progress=progress,
        )
        out = Path(cfg.eval.out)
        write_reports(reports, out, title=f"{cfg.eval.bench}, k={cfg.eval.k}")
    return TrainResult(drafter_dir, reports, trainer.global_step, train_tokens, train_seconds)
