"""Drafter kinds: everything the trainer, the CLI and the report need to know about one kind of
drafter, registered by name (`draft.name` in a recipe) next to its implementation.

A kind bundles plain functions over its nn.Module (EAGLE-3's lives in specdec.eval.drafters, beside
the session the engine runs; PARD's is a plain transformers causal LM): its recipe dataclass, how a
fresh drafter is built and how its untrained start is rebuilt, how a training batch becomes the
tensors its objectives take (and which of them come from the target's final state, so that the
trainer caches that state only when an objective takes one), the diagnostics logged every logging
step, its inference session (and other serving modes), how it is saved and loaded, and the formats it is
exported in for vLLM and SGLang. DrafterModule, the data
module, `specdec-train`, `specdec-eval` and the benchmarks go through these alone, so a new kind is
one file here with `register_drafter(name, DrafterKind(...))` and one import line below.
"""

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from specdec.data_prep import Target, TargetConfig
from specdec.eval.drafters import Drafter
from specdec.trainer.registry import add_entry, lookup

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DrafterKind:
    config: type  # the recipe's `draft` dataclass; its target_layers(num_layers) names the layers the drafter reads
    # (draft cfg, target, token samples {input_ids, loss_mask}, seed) -> a fresh float32 drafter
    build: Callable[[object, Target, Iterable[Batch], int], nn.Module]
    # (trained drafter, target model, seed) -> its untrained start in the target's dtype, eval mode
    untrained_like: Callable[[nn.Module, PreTrainedModel, int], nn.Module]
    # (drafter, batch, target_hidden [B, T, L, H] of the cached layers, lm_head [V, H], draft cfg, the inputs
    #   the recipe's objectives take) -> the keyword tensors of the objectives (and of `diagnostics`); inputs
    #   that cost extra (EAGLE-3's CTC frames) are computed only when an objective takes them
    training_inputs: Callable[
        [nn.Module, Batch, torch.Tensor, torch.Tensor, object, frozenset[str]], dict[str, torch.Tensor]
    ]
    inputs: frozenset[str]  # the keys training_inputs returns: what this kind's objectives may take
    # the inputs computed from the target's final normed state (the teacher): when a recipe's objectives
    # take one, that state (layer N) is cached after the drafter's own layers and target_hidden ends with it
    teacher_inputs: frozenset[str]
    # (training inputs, draft tokens per verify step at serving) -> train/* metrics
    diagnostics: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]
    # names of the drafter's tensors that belong to the target (never trained, saved or checkpointed)
    shared_keys: Callable[[nn.Module], set[str]]
    # (drafter as served, feature layers) -> the engine's session
    session: Callable[[nn.Module, tuple[int, ...]], Drafter]
    # (drafter, dtype) -> a copy in `dtype`, eval mode, sharing the target's tensors: what the eval hook decodes
    serving_copy: Callable[[nn.Module, torch.dtype], nn.Module]
    # (drafter, directory, target config, feature layers) -> the directory
    save: Callable[[nn.Module, Path, PretrainedConfig, tuple[int, ...]], Path]
    # (directory, target model, feature layers for a directory that records none, or None for the
    # kind's default) -> (drafter in the target's dtype, feature layers)
    load: Callable[[Path, PreTrainedModel, tuple[int, ...] | None], tuple[nn.Module, tuple[int, ...]]]
    is_saved: Callable[[Path], bool]  # whether a directory holds a drafter of this kind
    module: str  # where it is registered, for the duplicate-name error
    # other ways to serve the same drafter, by name (`eval.compare[].mode`); `session` is the default
    modes: Mapping[str, Callable[[nn.Module, tuple[int, ...]], Drafter]] = field(default_factory=dict)
    # the directories it is exported as for the engines, by export.format
    exports: Mapping[str, "Exporter"] = field(default_factory=dict)
    # (draft cfg, the recipe's objectives: name -> config) -> problems with the pair, for the recipe check
    check: Callable[[object, Mapping[str, object]], list[str]] = lambda draft_cfg, objectives: []


@dataclass(frozen=True)
class ExportTarget:
    """What an export records of the target its drafter serves."""

    name: str  # the target's Hub id (the card's base_model, the speculators verifier), or its local path
    revision: str | None
    config: PretrainedConfig
    dtype: torch.dtype  # of the weights written
    tokenizer_cfg: TargetConfig  # where the target's tokenizer loads from (written beside full causal LMs)

    def vllm_command(self, speculative_config: dict) -> str:
        revision = f" --revision {self.revision}" if self.revision else ""
        return f"vllm serve {self.name}{revision} --speculative-config '{json.dumps(speculative_config)}'"

    def sglang_command(self, algorithm: str, where: str, k: int) -> str:
        """A chain of k drafts (top-1 at each step) from the drafter at `where`."""
        revision = f" --revision {self.revision}" if self.revision else ""
        return (
            f"python -m sglang.launch_server --model-path {self.name}{revision} --speculative-algorithm {algorithm} "
            f"--speculative-draft-model-path {where} --speculative-num-steps {k} --speculative-eagle-topk 1 "
            f"--speculative-num-draft-tokens {k + 1}"
        )


@dataclass(frozen=True)
class Exporter:
    """One export format of a drafter kind."""

    # (drafter directory, empty output directory, target, draft tokens per step) -> writes config.json and
    # model.safetensors (and what else the format holds); returns the target layers (HF ids) it reads, or ()
    write: Callable[[Path, Path, ExportTarget, int], tuple[int, ...]]
    # (where it is served from: a Hub id or a directory, target, draft tokens per step, its layers)
    #   -> {engine: the command that serves it, or what to do instead}
    serve: Callable[[str, ExportTarget, int, tuple[int, ...]], dict[str, str]]
    tags: tuple[str, ...]  # the card's Hub tags
    library: str | None = None  # the card's library_name (transformers for a full causal LM)


DRAFTERS: dict[str, DrafterKind] = {}


def register_drafter(name: str, kind: DrafterKind) -> DrafterKind:
    add_entry(DRAFTERS, name, kind, kind="drafter", module=kind.module)
    return kind


def drafter_kind(name: str) -> DrafterKind:
    return lookup(DRAFTERS, name, key="draft.name", kind="drafter")


def drafter_name(kind: DrafterKind) -> str:
    """The name `kind` is registered under (draft.name)."""
    return next(name for name, known in DRAFTERS.items() if known is kind)


def saved_kind(directory: str | Path) -> DrafterKind | None:
    """The kind whose saved drafter `directory` holds, or None (e.g. a plain causal LM)."""
    return next((kind for kind in DRAFTERS.values() if kind.is_saved(Path(directory))), None)


from specdec.trainer.drafters import ctc, eagle3, pard  # noqa: E402 (they register here)

__all__ = [
    "DRAFTERS",
    "DrafterKind",
    "ExportTarget",
    "Exporter",
    "ctc",
    "drafter_kind",
    "drafter_name",
    "eagle3",
    "pard",
    "register_drafter",
    "saved_kind",
]
