"""EAGLE-3 drafter directories as the trainers and engines write them, read into one Eagle3Model,
and written for each engine (shared/reference/ecosystem.md, sections 1a and 1d).

Three dialects hold the same tensors (fc, the decoder layer, norm, lm_head, d2t, t2d):

    specdec      our run.dir/drafter: native EAGLE-3, plus `specdec_target_layers` (HF ids)
    native       SGLang / SpecForge / the EAGLE reference code: `LlamaForCausalLMEagle3`, layer
                 `midlayer.*`, maybe the target's embedding; layer ids, when recorded, in
                 `eagle_config.eagle_aux_hidden_state_layer_ids` (SGLang's meaning) or top level
                 `eagle_aux_hidden_state_layer_ids` (vLLM's meaning)
    speculators  vllm-project/speculators: `speculators_model_type: eagle3`, the layer's config in
                 `transformer_layer_config`, layer `layers.0.*`, ids at top level (vLLM's meaning)

Target layer ids. specdec names a layer by its HF `output_hidden_states` index (0 = embeddings,
i = the output of decoder layer i-1 = the input of decoder layer i). vLLM's ids mean the same.
SGLang's (and SpecForge's) name the decoder layer whose output is taken, so they are ours minus
one: SmolLM2's [2, 15, 27] are SGLang's [1, 14, 26]. An id not recorded at all means the engines'
default, the inputs of layers 2, N//2 and N-3, which is what EAGLE-3 and specdec train with.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, PretrainedConfig

from specdec.eval.drafters import DrafterLoadError
from specdec.eval.drafters.eagle3 import Eagle3Model, shared_keys

log = logging.getLogger(__name__)

EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"  # the class name SGLang loads
SPECULATORS_ARCHITECTURE = "Eagle3Speculator"
SPECULATORS_LAYER_PREFIX = "layers.0."  # speculators' name for the decoder layer
LAYER_PREFIX = "midlayer."  # the native name, which Eagle3Model uses
# The draft layer's fields, copied from the target when specdec builds a drafter.
LAYER_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",  # transformers 4's spelling, which LlamaConfig turns into rope_parameters
    "rope_parameters",
    "max_position_embeddings",
    "vocab_size",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
)
# speculators' EAGLE-3 variants (EAGLE-3.1, gpt-oss heads) that this drafter does not compute
_UNSUPPORTED_FLAGS = ("norm_before_fc", "fc_norm", "norm_output")


def default_target_layers(num_layers: int) -> tuple[int, ...]:
    """The inputs of decoder layers 2, N//2 and N-3 (EAGLE-3 reference code, vLLM and SGLang)."""
    return (2, num_layers // 2, num_layers - 3)


def to_sglang_ids(layers) -> list[int]:
    return [layer - 1 for layer in layers]


def from_sglang_ids(ids) -> tuple[int, ...]:
    return tuple(layer_id + 1 for layer_id in ids)


@dataclass(frozen=True)
class Eagle3Checkpoint:
    """An EAGLE-3 directory of any dialect, in Eagle3Model's terms."""

    layer_config: dict  # the draft decoder layer's Llama config fields
    draft_vocab_size: int
    norm_before_residual: bool
    target_layers: tuple[int, ...] | None  # HF output_hidden_states ids; None when not recorded
    target_hidden_size: int | None  # the width of the target states fc reads, when it differs from the layer's
    tensors: dict[str, torch.Tensor]  # Eagle3Model's names; may hold embed_tokens.weight


def is_eagle3_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    fields = json.loads(config.read_text())
    architectures = fields.get("architectures") or []
    return any(name.endswith("Eagle3") for name in architectures) or "speculators_model_type" in fields


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard its index lists; never a pickle."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {name: tensor for shard in shards for name, tensor in load_file(str(directory / shard)).items()}
    found = ", ".join(sorted(path.name for path in directory.iterdir())) or "nothing"
    raise DrafterLoadError(
        f"{directory}: no model.safetensors (or model.safetensors.index.json) beside config.json; found {found}. "
        "specdec reads weights only from safetensors (a .bin is a pickle); convert it with "
        "transformers' save_pretrained(..., safe_serialization=True)."
    )


def _native_layers(directory: Path, config: dict) -> tuple[int, ...] | None:
    ours = config.get("specdec_target_layers")
    vllm = config.get("eagle_aux_hidden_state_layer_ids")
    sglang = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ours is not None:
        return tuple(ours)
    if vllm is not None and sglang is not None and tuple(vllm) != from_sglang_ids(sglang):
        raise DrafterLoadError(
            f"{directory / 'config.json'}: eagle_aux_hidden_state_layer_ids={vllm} (vLLM's meaning: HF hidden-state "
            f"ids) and eagle_config.eagle_aux_hidden_state_layer_ids={sglang} (SGLang's: decoder layer outputs, "
            "HF id - 1) name different layers; fix the one that is wrong, or give eval.target_layers (HF ids)."
        )
    if vllm is not None:
        return tuple(vllm)
    return from_sglang_ids(sglang) if sglang is not None else None


def read_eagle3_dir(directory: str | Path) -> Eagle3Checkpoint:
    """The directory's drafter in one form, whatever wrote it; DrafterLoadError names what does not fit."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    tensors = _load_tensors(directory)
    if "speculators_model_type" in config:
        if config["speculators_model_type"] != "eagle3":
            raise DrafterLoadError(
                f"{directory / 'config.json'}: speculators_model_type={config['speculators_model_type']!r}; "
                "specdec serves speculators drafters of type eagle3."
            )
        layer_config = dict(config.get("transformer_layer_config") or {})
        target_layers = config.get("eagle_aux_hidden_state_layer_ids")
        target_layers = tuple(target_layers) if target_layers is not None else None
        # speculators' config class defaults to False; vLLM reads a missing key as True (ecosystem.md 1a)
        norm_before_residual = bool(config.get("norm_before_residual", True))
        tensors = {
            LAYER_PREFIX + name.removeprefix(SPECULATORS_LAYER_PREFIX)
            if name.startswith(SPECULATORS_LAYER_PREFIX)
            else name: tensor
            for name, tensor in tensors.items()
        }
    else:
        if not (config.get("eagle_config") or {}).get("use_aux_hidden_state", True):
            raise DrafterLoadError(
                f"{directory / 'config.json'}: eagle_config.use_aux_hidden_state=false is an EAGLE-1 style head "
                "(one hidden state, no fc); specdec serves EAGLE-3 drafters."
            )
        layer_config, target_layers = config, _native_layers(directory, config)
        norm_before_residual = bool(config.get("norm_before_residual", False))
    flags = [name for name in _UNSUPPORTED_FLAGS if config.get(name)]
    if flags:
        raise DrafterLoadError(
            f"{directory / 'config.json'}: {', '.join(f'{name}=true' for name in flags)}: an EAGLE-3 variant whose "
            "extra norms specdec's drafter does not compute; it serves the EAGLE-3 layer of the paper."
        )
    if layer_config.get("num_hidden_layers", 1) != 1:
        raise DrafterLoadError(
            f"{directory / 'config.json'}: num_hidden_layers={layer_config['num_hidden_layers']}; specdec serves "
            "EAGLE-3 drafters of one decoder layer."
        )
    draft_vocab_size = config.get("draft_vocab_size") or layer_config.get("vocab_size")
    target_hidden_size = config.get("target_hidden_size") or layer_config.get("target_hidden_size")
    return Eagle3Checkpoint(
        layer_config, draft_vocab_size, norm_before_residual, target_layers, target_hidden_size, tensors
    )


def _embedding(checkpoint: Eagle3Checkpoint, target: nn.Module, directory: Path) -> nn.Embedding:
    """The target's embedding, shared, unless the directory's own differs (beyond the rounding of the
    target's to the file's dtype, as a bf16 copy of a float32 target is): then a private copy. The
    directory's tensor is never written into the target's."""
    shared = target.get_input_embeddings()
    own = checkpoint.tensors.get("embed_tokens.weight")
    if own is None or (own.shape == shared.weight.shape and torch.equal(own, shared.weight.to(own.dtype))):
        return shared
    if own.shape != shared.weight.shape:
        raise DrafterLoadError(
            f"{directory}: its embed_tokens.weight is {tuple(own.shape)}, the target's embedding "
            f"{tuple(shared.weight.shape)}: a drafter for another target."
        )
    log.info(
        "%s carries its own token embedding (not the target's): the drafter uses it, the target keeps its own",
        directory,
    )
    return nn.Embedding.from_pretrained(own.to(shared.weight.dtype), freeze=True)


def load_own_state(draft: nn.Module, state: dict[str, torch.Tensor], refusal: str) -> None:
    """Load a drafter's own tensors (all but those it borrows from the target, `shared_keys`); one
    missing, misfit or unexpected raises DrafterLoadError, `refusal` followed by what did not fit."""
    try:
        missing, unexpected = draft.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that do not fit this target
        missing, unexpected = [str(error).splitlines()[-1].strip()], []
    missing = [key for key in missing if key not in shared_keys(draft)]
    if missing or unexpected:
        raise DrafterLoadError(
            f"{refusal} (missing or misfit {missing[:4]}, unexpected {unexpected[:4]}). Give a drafter trained "
            "for the same target.path."
        )


def load_eagle3(directory: str | Path, target: nn.Module, target_layers=None) -> tuple[Eagle3Model, tuple[int, ...]]:
    """The drafter of an EAGLE-3 directory of any dialect, in the target's dtype, and the HF ids of
    the target layers it reads: those the directory records, else `target_layers`, else the
    engines' default."""
    directory = Path(directory)
    checkpoint = read_eagle3_dir(directory)
    target_config = target.config
    layer_config = checkpoint.layer_config
    widths = {layer_config.get("hidden_size"), checkpoint.target_hidden_size or layer_config.get("hidden_size")}
    if widths != {target_config.hidden_size}:
        raise DrafterLoadError(
            f"{directory / 'config.json'}: hidden_size={layer_config.get('hidden_size')} (target_hidden_size="
            f"{checkpoint.target_hidden_size}), the target's is {target_config.hidden_size}: not an EAGLE-3 drafter "
            "for this target (specdec serves draft layers as wide as the target). Give a drafter trained for the "
            "same target.path."
        )
    fields = {name: value for name, value in layer_config.items() if name in LAYER_FIELDS}
    config = LlamaConfig(**{**fields, "vocab_size": target_config.vocab_size})
    embedding = _embedding(checkpoint, target, directory)
    draft = Eagle3Model(
        config,
        draft_vocab_size=checkpoint.draft_vocab_size,
        embed_tokens=embedding,
        norm_before_residual=checkpoint.norm_before_residual,
    )
    state = {name: tensor for name, tensor in checkpoint.tensors.items() if name != "embed_tokens.weight"}
    if "d2t" not in state and checkpoint.draft_vocab_size == target_config.vocab_size:  # a full-vocabulary head
        state["d2t"] = torch.zeros(checkpoint.draft_vocab_size, dtype=torch.long)
        state["t2d"] = torch.ones(target_config.vocab_size, dtype=torch.bool)
    load_own_state(draft, state, f"{directory}: not an EAGLE-3 drafter for this target")
    layers = checkpoint.target_layers
    if layers is None and target_layers is not None:
        layers = tuple(target_layers)
        log.info("%s records no target layer ids: HF ids %s as given", directory, list(layers))
    elif layers is None:
        layers = default_target_layers(target_config.num_hidden_layers)
        log.info("%s records no target layer ids: the engines' default, HF ids %s", directory, list(layers))
    elif target_layers is not None and tuple(target_layers) != tuple(layers):
        log.warning(
            "%s records target layers %s (HF ids); they are used, not the %s given",
            directory,
            list(layers),
            list(target_layers),
        )
    num_layers, fc_reads = target_config.num_hidden_layers, draft.fc.in_features // target_config.hidden_size
    if len(layers) != fc_reads or not all(0 <= i <= num_layers for i in layers):
        raise DrafterLoadError(
            f"{directory}: target layers {list(layers)} do not fit: its fc reads {fc_reads} layers, and ids run "
            f"from 0 (the embeddings) to {num_layers} (HF output_hidden_states ids); fix eval.target_layers or the "
            "directory's config."
        )
    return draft.to(dtype=target.get_input_embeddings().weight.dtype).eval(), tuple(layers)


# ---- writing ----


def _layer_config(fields: dict) -> dict:
    """The draft layer's fields as JSON, RoPE both ways: `rope_theta`/`rope_scaling` (what engines on
    transformers 4 read) and `rope_parameters` (transformers 5)."""
    fields = {name: fields[name] for name in LAYER_FIELDS if fields.get(name) is not None}
    rope = dict(fields.get("rope_parameters") or {})
    if rope:
        fields["rope_theta"] = rope.get("rope_theta", fields.get("rope_theta"))
        scaling = {name: value for name, value in rope.items() if name != "rope_theta"}
        fields["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    return {"model_type": "llama", **fields, "num_hidden_layers": 1, "tie_word_embeddings": False}


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype, layer_prefix: str) -> dict[str, torch.Tensor]:
    """Floats in `dtype` (d2t and t2d keep theirs), the layer under `layer_prefix`, never an embedding."""
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("embed_tokens."):
            continue
        if name.startswith(LAYER_PREFIX):
            name = layer_prefix + name.removeprefix(LAYER_PREFIX)
        out[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    return out


def save_eagle3(model: Eagle3Model, directory: str | Path, *, target_config: PretrainedConfig, target_layers) -> Path:
    """specdec's own directory: native EAGLE-3 (config.json and model.safetensors, float32, no
    embedding) that names its target layers as HF ids in `specdec_target_layers`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        **{
            name: getattr(target_config, name)
            for name in LAYER_FIELDS
            if hasattr(target_config, name) and name != "rope_scaling"  # an alias of rope_parameters here
        },
        architectures=[EAGLE3_ARCHITECTURE],
        num_hidden_layers=1,
        tie_word_embeddings=False,
        draft_vocab_size=model.lm_head.out_features,
        specdec_target_layers=list(target_layers),  # HF output_hidden_states ids: 0 = embeddings
    )
    config.save_pretrained(directory)  # config.json
    own = {name: tensor.detach() for name, tensor in model.state_dict().items() if name not in shared_keys(model)}
    save_file(_cast(own, torch.float32, LAYER_PREFIX), str(directory / "model.safetensors"))
    return directory


def _write(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(directory / "model.safetensors"))


def write_sglang(checkpoint: Eagle3Checkpoint, target_layers, directory: Path, *, dtype: torch.dtype) -> None:
    """The native EAGLE-3 directory SGLang loads (and SpecForge writes): layer ids in SGLang's meaning
    under eagle_config, no embedding."""
    config = {
        "architectures": [EAGLE3_ARCHITECTURE],
        **_layer_config(checkpoint.layer_config),
        "draft_vocab_size": checkpoint.draft_vocab_size,
        "norm_before_residual": checkpoint.norm_before_residual,
        "eagle_config": {
            "use_aux_hidden_state": True,
            "eagle_aux_hidden_state_layer_ids": to_sglang_ids(target_layers),
        },
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    _write(directory, config, _cast(checkpoint.tensors, dtype, LAYER_PREFIX))


def write_speculators(
    checkpoint: Eagle3Checkpoint,
    target_layers,
    directory: Path,
    *,
    dtype: torch.dtype,
    verifier: str,
    verifier_architectures: list[str],
    speculative_tokens: int,
    speculators_version: str,
) -> None:
    """The vllm-project/speculators directory (`vllm serve DIR` loads it with its verifier): layer ids
    in vLLM's meaning at top level, the layer as `layers.0.*`, norm_before_residual written out (vLLM
    reads a missing one as true)."""
    config = {
        "architectures": [SPECULATORS_ARCHITECTURE],
        "speculators_model_type": "eagle3",
        "speculators_version": speculators_version,
        "transformer_layer_config": _layer_config(checkpoint.layer_config),
        "draft_vocab_size": checkpoint.draft_vocab_size,
        "norm_before_residual": checkpoint.norm_before_residual,
        "target_hidden_size": None,  # the draft layer is as wide as the target
        "eagle_aux_hidden_state_layer_ids": list(target_layers),
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": speculative_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": verifier_architectures},
        },
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    _write(directory, config, _cast(checkpoint.tensors, dtype, SPECULATORS_LAYER_PREFIX))
