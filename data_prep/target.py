"""Turn a target reference into a frozen model and its tokenizer: the first step of every stage.

A reference is a Hugging Face Hub id (with a revision), a local directory in the HF layout, or a
GGUF file (transformers de-quantizes it to the chosen dtype). The model comes back in eval mode
with every parameter frozen, so it can sit inside a LightningModule (online mode) without ever
receiving a gradient or entering a drafter checkpoint.
"""

import logging
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils.hub import extract_commit_hash

log = logging.getLogger(__name__)


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class TargetConfig:
    path: str  # Hub id, local directory, or a .gguf file
    revision: str | None = None  # Hub branch, tag or commit; None = main
    gguf_file: str | None = None  # a GGUF file inside `path` (a Hub repo or a directory)
    dtype: DType = DType.float32
    trust_remote_code: bool = False  # runs code from the model repo: only when a recipe asks
    # Architecture fields to override, with seeded random weights instead of the pretrained ones:
    # a tiny model of the target's family and tokenizer, for tests. Typed Any because Hydra cannot
    # override an Optional[Dict] that is None (`target.random_init={...}` raises inside OmegaConf).
    random_init: Any = None


@dataclass(frozen=True)
class Target:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reference: str  # what was loaded: a local path, or a Hub id at its commit ("org/name@<sha>"); in cache keys


class TargetLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class _Source:
    location: str  # first argument of from_pretrained
    kwargs: dict[str, Any]
    on_hub: bool


def _source(cfg: TargetConfig, key: str) -> _Source:
    """Where `from_pretrained` finds the reference, or a clear error when it cannot be anywhere."""
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file is not None:
        kwargs["gguf_file"] = cfg.gguf_file
    path = Path(cfg.path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise TargetLoadError(
                f"{key}={cfg.path} is a file but not a .gguf file. Point {key} at a GGUF file, "
                "at a model directory (config.json and weights), or at a Hub id."
            )
        return _Source(str(path.parent), {**kwargs, "gguf_file": path.name}, on_hub=False)
    if path.is_dir():
        return _Source(str(path), kwargs, on_hub=False)
    looks_local = cfg.path.startswith(("/", "./", "../", "~")) or cfg.path.endswith(".gguf")
    try:
        validate_repo_id(cfg.path)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise FileNotFoundError(
            f"{key}={cfg.path} does not exist (resolved to {path.resolve()}). Set {key} to "
            "an existing model directory or .gguf file, or to a Hub id such as meta-llama/Llama-3.1-8B-Instruct."
        )
    return _Source(cfg.path, {**kwargs, "revision": cfg.revision}, on_hub=True)


def _resolved_commit(source: _Source) -> str:
    """The commit of a Hub reference that was just loaded, read from the local Hub cache (no network):
    loading resolved the revision (a branch or tag moves) and recorded it there."""
    revision = source.kwargs["revision"] or "main"
    filename = source.kwargs.get("gguf_file") or "config.json"
    cached = try_to_load_from_cache(source.location, filename, revision=revision)
    commit = extract_commit_hash(cached, None) if isinstance(cached, str) else None
    if commit is None:
        log.warning(
            "%s@%s: its commit is not in the Hugging Face cache (%s); caches are keyed on the revision name, "
            "so a cache built before the revision moved would be reused",
            source.location,
            revision,
            huggingface_hub.constants.HF_HUB_CACHE,
        )
        return revision
    return commit


def _reference(source: _Source) -> str:
    """A stable name of what was loaded, for logs and cache keys: a Hub id at its resolved commit,
    or the local path."""
    name = f"{source.location}@{_resolved_commit(source)}" if source.on_hub else source.location
    gguf_file = source.kwargs.get("gguf_file")
    return f"{name}/{gguf_file}" if gguf_file else name


def _offline_error(cfg: TargetConfig, key: str, cause: Exception) -> TargetLoadError:
    revision = cfg.revision or "main"
    return TargetLoadError(
        f"{key}={cfg.path} (revision {revision}) is a Hub id, but it could not be loaded from the "
        "Hugging Face Hub and no copy was found in the local cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}). On a machine with access, run "
        f"`hf download {cfg.path} --revision {revision} --local-dir DIR` (gated models also need "
        f"`hf auth login`), copy DIR here and set {key}=DIR. Underlying error: "
        f"{str(cause).splitlines()[0]}"
    )


def _random_model(config: Any, overrides: dict[str, Any], dtype: torch.dtype, seed: int) -> PreTrainedModel:
    unknown = sorted(name for name in overrides if not hasattr(config, name))
    if unknown:
        raise TargetLoadError(
            f"target.random_init has keys that {type(config).__name__} does not have: {', '.join(unknown)}. "
            "Use fields of the target's config.json (e.g. num_hidden_layers, hidden_size)."
        )
    for name, value in overrides.items():
        setattr(config, name, value)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _from_pretrained(load, source: _Source, cfg: TargetConfig, key: str, **kwargs: Any) -> Any:
    try:
        return load(source.location, **source.kwargs, **kwargs)
    except OSError as error:
        if source.on_hub:
            raise _offline_error(cfg, key, error) from error
        raise TargetLoadError(f"{key}={cfg.path}: could not load it: {error}") from error


def load_tokenizer(cfg: TargetConfig, *, key: str = "target.path") -> PreTrainedTokenizerBase:
    """The tokenizer of a reference alone; `key` is the recipe key named in errors."""
    try:
        return _from_pretrained(AutoTokenizer.from_pretrained, _source(cfg, key), cfg, key)
    except ValueError as error:  # transformers' word for "no tokenizer files here"
        raise TargetLoadError(
            f"{key}={cfg.path}: no tokenizer loads from it ({str(error).splitlines()[0]}). A directory needs its "
            "tokenizer files (tokenizer.json, tokenizer_config.json): a drafter directory saved by specdec-train "
            "holds none, its export (specdec-export, run.dir/export) does; or give the model it was trained from."
        ) from error


def load_target_config(cfg: TargetConfig, *, key: str = "target.path") -> PretrainedConfig:
    """The target's config alone, without its weights (`random_init` applied), and its model class
    in `architectures` even where the source leaves it out (a GGUF file does)."""
    config = _from_pretrained(AutoConfig.from_pretrained, _source(cfg, key), cfg, key)
    for name, value in dict(cfg.random_init or {}).items():
        setattr(config, name, value)
    if not config.architectures:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def load_target(cfg: TargetConfig, *, seed: int = 0, key: str = "target.path") -> Target:
    """Load the frozen target and its tokenizer; `seed` only matters with `random_init`; `key` is
    the recipe key named in errors (a frozen model loaded as a drafter passes its own)."""
    source = _source(cfg, key)
    dtype = getattr(torch, DType(cfg.dtype).value)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, source, cfg, key)
    if cfg.random_init is None:
        model = _from_pretrained(AutoModelForCausalLM.from_pretrained, source, cfg, key, dtype=dtype)
    else:
        config = _from_pretrained(AutoConfig.from_pretrained, source, cfg, key)
        model = _random_model(config, dict(cfg.random_init), dtype, seed)
    if model.config.vocab_size < len(tokenizer):
        raise TargetLoadError(
            f"{key}={cfg.path}: the model's vocab_size {model.config.vocab_size} is smaller than its "
            f"tokenizer ({len(tokenizer)} tokens). Check target.random_init.vocab_size or the files."
        )
    model.eval().requires_grad_(False)
    reference = _reference(source)
    log.info(
        "target %s: %d layers, hidden %d, vocab %d, %s, %.1fM parameters%s",
        reference,
        model.config.num_hidden_layers,
        model.config.hidden_size,
        model.config.vocab_size,
        dtype,
        sum(p.numel() for p in model.parameters()) / 1e6,
        " (random weights)" if cfg.random_init is not None else "",
    )
    return Target(model=model, tokenizer=tokenizer, reference=reference)


def check_same_tokenizer(
    target: PreTrainedTokenizerBase, draft: PreTrainedTokenizerBase, *, target_name: str, draft_name: str
) -> None:
    """Raise unless both tokenizers map every token to the same id: a draft proposes target token ids."""
    target_vocab, draft_vocab = target.get_vocab(), draft.get_vocab()
    problems = []
    if len(target_vocab) != len(draft_vocab):
        problems.append(f"{len(target_vocab)} tokens vs {len(draft_vocab)}")
    differing = sorted(
        (token_id, token) for token, token_id in target_vocab.items() if draft_vocab.get(token) != token_id
    )
    if differing:
        shown = ", ".join(f"{token!r} is id {token_id} in the target" for token_id, token in differing[:3])
        problems.append(f"{len(differing)} tokens have other ids ({shown})")
    if target.eos_token_id != draft.eos_token_id:
        problems.append(f"eos id {target.eos_token_id} vs {draft.eos_token_id}")
    if problems:
        raise TargetLoadError(
            f"The draft tokenizer ({draft_name}) disagrees with the target's ({target_name}): "
            f"{'; '.join(problems)}. A drafter must share the target's tokenizer, since the target verifies "
            "the draft's token ids; initialise the draft from a model of the target's family."
        )
