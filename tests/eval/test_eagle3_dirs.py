"""EAGLE-3 drafter directories written by other projects, read by specdec-eval (eval/drafters/eagle3_dirs.py).

specdec-eval measures EAGLE-3 drafters trained elsewhere, so these tests write small directories the way
each project lays them out and check that `load_eagle3` serves the drafter they hold: its weights, the
target layers it reads (in HF `output_hidden_states` ids), and the target's embedding, shared and untouched.

    SpecForge (commit a6b6b02)   `specforge export --to sglang`: a transformers config of the draft layer,
                                 bf16 tensors `midlayer.*`, no embedding and no layer ids
                                 (specforge/export/checkpoint_io.py, to_sglang.py 33-38 and 85-86);
                                 `--to hf`: the same plus the target's `embed_tokens.weight` (to_hf.py 86-117)
    SGLang / vLLM                layer ids nested in `eagle_config` (SGLang: output of decoder layer i, so
                                 HF id i+1; set_eagle3_layers_to_capture) or at top level (vLLM: HF ids)
    vllm-project/speculators     0.9.0 Eagle3 save: `Eagle3Speculator`, the layer's config in
                                 `transformer_layer_config`, tensors `layers.0.*` plus the target's embedding
                                 (models/eagle3/core.py, model.py; convert/eagle/eagle3_converter.py)

and the two directories specdec writes for the engines (`write_sglang`, `write_speculators`) load back.
The target is a tiny float32 Llama whose weights are bf16 values (as if loaded from a bf16 checkpoint), so
a bf16 copy of its embedding is exact, and the drafters' weights are bf16 values too, so a bf16 file of
them loads into float32 without rounding and outputs compare exactly.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from specdec.eval.drafters import DrafterLoadError
from specdec.eval.drafters.eagle3 import Eagle3Layer, Eagle3Model
from specdec.eval.drafters.eagle3_dirs import (
    default_target_layers,
    is_eagle3_dir,
    load_eagle3,
    read_eagle3_dir,
    save_eagle3,
    write_sglang,
    write_speculators,
)

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 64, 32, 4, 2, 8, 64
NUM_LAYERS = 8  # default_target_layers(8) = (2, 4, 5): three distinct ids
DRAFT_VOCAB = 16
ROPE_THETA, RMS_EPS, MAX_POSITIONS = 5000.0, 1e-5, 256  # not LlamaConfig's defaults: a dropped field shows
RECORDED = (1, 3, 7)  # HF ids a directory records in the tests below: not the default ones
LAYER_KEYS = (  # the decoder layer's tensors, under `midlayer.` (native) or `layers.0.` (speculators)
    "input_layernorm.weight",
    "hidden_norm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


# ---- the target, and the drafters the directories are written from ----


def _bf16_values(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.bfloat16().to(tensor.dtype)


def _target(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=RMS_EPS,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_theta": ROPE_THETA, "rope_type": "default"},
        pad_token_id=0,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(_bf16_values(parameter))  # as loaded from a bf16 checkpoint
    return model.to(dtype)


def _drafter(target: LlamaForCausalLM, *, norm_before_residual: bool = False, seed: int = 1) -> Eagle3Model:
    """A random EAGLE-3 head on the target (the layer's config is the target's, as SpecForge and specdec
    build it), bf16-valued weights, d2t/t2d for a sorted random subset of the target vocabulary."""
    draft = Eagle3Model(
        target.config,
        draft_vocab_size=DRAFT_VOCAB,
        embed_tokens=target.get_input_embeddings(),
        norm_before_residual=norm_before_residual,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in draft.named_parameters():
            if not name.startswith("embed_tokens."):
                noise = torch.randn(parameter.shape, generator=generator) * 0.3
                parameter.copy_(_bf16_values(noise.to(parameter.dtype)))
        used = torch.randperm(VOCAB, generator=generator)[:DRAFT_VOCAB].sort().values
        draft.d2t.copy_(used - torch.arange(DRAFT_VOCAB))  # target id = draft id + d2t[draft id]
        draft.t2d.zero_()[used] = True
    return draft.eval()


def _tensors(draft: Eagle3Model, *, layer_prefix: str = "midlayer.") -> dict[str, torch.Tensor]:
    """The head's tensors as the trainers save them: floats in bf16, d2t int64, t2d bool, no embedding."""
    state = draft.state_dict()
    names = ["fc.weight", "norm.weight", "lm_head.weight", *(f"midlayer.{key}" for key in LAYER_KEYS)]
    tensors = {name.replace("midlayer.", layer_prefix): state[name].bfloat16().contiguous() for name in names}
    return {**tensors, "d2t": state["d2t"].clone(), "t2d": state["t2d"].clone()}


# ---- the directories, as each project writes them ----


def _specforge_config() -> dict:
    """SpecForge a6b6b02 `specforge export --to sglang|hf`: the draft config passed through transformers'
    save_pretrained (specforge/export/checkpoint_io.py). No eagle_config and no layer ids at all, so the
    engines read their default layers."""
    return {
        "architectures": ["LlamaForCausalLMEagle3"],  # the class SGLang loads
        "model_type": "llama",
        "hidden_size": HIDDEN,  # the draft layer's sizes: the target's
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": RMS_EPS,
        "rope_parameters": {"rope_theta": ROPE_THETA, "rope_type": "default"},  # transformers 5's field
        "rope_theta": ROPE_THETA,  # top level too: SpecForge's apply_legacy_rope_scaling adds it
        "vocab_size": VOCAB,  # the target's vocabulary (the embedding's rows)
        "draft_vocab_size": DRAFT_VOCAB,  # the LM head's rows
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "attention_bias": False,
        "mlp_bias": False,
    }


def _speculators_config(*, layer_ids, norm_before_residual: bool = True) -> dict:
    """vllm-project/speculators 0.9.0 Eagle3SpeculatorConfig as save_pretrained writes it
    (models/eagle3/config.py, core.py): transformer_layer_config is the draft layer's LlamaConfig."""
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",  # the registry key of the config class
        "speculators_version": "0.9.0",
        "transformer_layer_config": {
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": 1,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "hidden_act": "silu",
            "rms_norm_eps": RMS_EPS,
            "max_position_embeddings": MAX_POSITIONS,
            "rope_theta": ROPE_THETA,  # transformers 4's field (speculators pins transformers 4)
            "tie_word_embeddings": False,
        },
        "draft_vocab_size": DRAFT_VOCAB,
        "norm_before_residual": norm_before_residual,  # a pydantic field: always written
        "target_hidden_size": None,  # the draft layer is as wide as the target
        "eagle_aux_hidden_state_layer_ids": None if layer_ids is None else list(layer_ids),  # HF ids (vLLM's)
        "norm_before_fc": False,  # EAGLE-3.1 / gpt-oss variants, off
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {"proposal_type": "greedy", "speculative_tokens": 3, "verifier_accept_k": 1, "accept_tolerance": 0.0}
            ],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": "org/target", "architectures": ["LlamaForCausalLM"]},
        },
        "auto_map": {"": "config.Eagle3SpeculatorConfig"},
    }


def _write(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def _specforge_sglang_dir(directory: Path, draft: Eagle3Model, **config) -> Path:
    """to_sglang.py drops every key containing "embed"; what is left is the head, in bf16."""
    return _write(directory, {**_specforge_config(), **config}, _tensors(draft))


def _specforge_hf_dir(directory: Path, draft: Eagle3Model, embedding: torch.Tensor) -> Path:
    """to_hf.py adds `embed_tokens.weight` [vocab, hidden], taken from the target (--embedding-source), bf16."""
    tensors = {**_tensors(draft), "embed_tokens.weight": embedding.detach().bfloat16().contiguous()}
    return _write(directory, _specforge_config(), tensors)


def _speculators_dir(directory: Path, draft: Eagle3Model, embedding: torch.Tensor, **config) -> Path:
    """speculators saves the layer as `layers.0.*` (eagle3_converter.py maps midlayer. -> layers.0.) and
    always saves its embedding, a copy of the target's."""
    tensors = {
        **_tensors(draft, layer_prefix="layers.0."),
        "embed_tokens.weight": embedding.detach().bfloat16().contiguous(),
    }
    layer_ids = config.pop("layer_ids", RECORDED)
    return _write(directory, {**_speculators_config(layer_ids=layer_ids), **config}, tensors)


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


# ---- what a loaded drafter must be ----


def _outputs(draft: Eagle3Model) -> torch.Tensor:
    """Two steps of the training-time test on fixed random inputs: depends on every weight and on RoPE."""
    generator = torch.Generator().manual_seed(3)
    target_hidden = torch.randn(2, 5, 3, HIDDEN, generator=generator).to(draft.fc.weight.dtype)
    next_ids = torch.randint(0, VOCAB, (2, 5), generator=generator)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    with torch.no_grad():
        return draft.unroll(target_hidden=target_hidden, next_ids=next_ids, attention_mask=mask, steps=2)


def _assert_weights(draft: Eagle3Model, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """The drafter holds exactly the file's tensors (the layer under its native name), floats in `dtype`."""
    state = {name: tensor for name, tensor in draft.state_dict().items() if not name.startswith("embed_tokens.")}
    expected = {
        name.replace("layers.0.", "midlayer."): tensor
        for name, tensor in tensors.items()
        if not name.startswith("embed_tokens.")
    }
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        want = tensor.to(dtype) if tensor.is_floating_point() else tensor
        assert state[name].dtype == want.dtype, name
        assert torch.equal(state[name], want), name


def _target_state(target: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in target.state_dict().items()}


# ---- 1. SpecForge `export --to sglang`: bf16, no layer ids, no embedding ----


@pytest.fixture
def specforge_sglang(tmp_path: Path):
    target = _target()
    draft = _drafter(target)
    return target, draft, _specforge_sglang_dir(tmp_path / "specforge", draft)


def test_specforge_sglang_export_reads_the_engines_default_layers(specforge_sglang) -> None:
    target, _, directory = specforge_sglang
    _, layers = load_eagle3(directory, target)
    assert layers == default_target_layers(NUM_LAYERS) == (2, 4, 5)


def test_specforge_sglang_export_loads_its_bf16_weights_in_the_targets_dtype(specforge_sglang) -> None:
    target, _, directory = specforge_sglang
    loaded, _ = load_eagle3(directory, target)
    _assert_weights(loaded, load_file(directory / "model.safetensors"), torch.float32)
    assert loaded.midlayer.norm_before_residual is False  # a native config without the key: EAGLE-3's residual


def test_specforge_sglang_export_shares_the_targets_embedding(specforge_sglang) -> None:
    target, _, directory = specforge_sglang
    loaded, _ = load_eagle3(directory, target)
    assert loaded.embed_tokens is target.get_input_embeddings()


def test_specforge_sglang_export_drafts_what_the_drafter_it_was_written_from_drafts(specforge_sglang) -> None:
    target, draft, directory = specforge_sglang
    loaded, _ = load_eagle3(directory, target)
    torch.testing.assert_close(_outputs(loaded), _outputs(draft), rtol=0, atol=0)


# ---- 2, 3. The embedding a directory carries: the target's (shared) or its own (kept apart) ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_specforge_hf_export_shares_an_embedding_equal_to_the_targets(tmp_path: Path, dtype: torch.dtype) -> None:
    target = _target(dtype)
    directory = _specforge_hf_dir(tmp_path, _drafter(target), target.get_input_embeddings().weight)
    loaded, _ = load_eagle3(directory, target)
    assert loaded.embed_tokens is target.get_input_embeddings()
    assert loaded.fc.weight.dtype == dtype


@pytest.mark.parametrize("embedding", ["the targets", "its own"])
def test_loading_leaves_the_target_bitwise_unchanged(tmp_path: Path, embedding: str) -> None:
    target = _target()
    own = target.get_input_embeddings().weight
    if embedding == "its own":
        own = own + torch.randn(own.shape, generator=torch.Generator().manual_seed(5))
    directory = _specforge_hf_dir(tmp_path, _drafter(target), own)
    before = _target_state(target)
    load_eagle3(directory, target)
    after = target.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name


def test_an_embedding_that_differs_from_the_targets_is_the_drafters_own(tmp_path: Path) -> None:
    target = _target()
    weight = target.get_input_embeddings().weight
    own = weight + torch.randn(weight.shape, generator=torch.Generator().manual_seed(5))
    directory = _specforge_hf_dir(tmp_path, _drafter(target), own)
    loaded, _ = load_eagle3(directory, target)
    assert loaded.embed_tokens is not target.get_input_embeddings()
    file_tensor = load_file(directory / "model.safetensors")["embed_tokens.weight"]
    assert torch.equal(loaded.embed_tokens.weight, file_tensor.float())
    assert not loaded.embed_tokens.weight.requires_grad


# ---- 4. Native layer ids: SGLang's (nested, decoder-layer outputs) and vLLM's (top level, HF ids) ----


@pytest.mark.parametrize(
    "recorded",
    [
        {"eagle_config": {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [0, 2, 6]}},
        {"eagle_aux_hidden_state_layer_ids": [1, 3, 7]},
        {
            "eagle_aux_hidden_state_layer_ids": [1, 3, 7],
            "eagle_config": {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [0, 2, 6]},
        },
    ],
    ids=["sglang-nested", "vllm-top-level", "both-agreeing"],
)
def test_native_layer_ids_are_read_in_each_engines_meaning(tmp_path: Path, recorded: dict) -> None:
    target = _target()
    directory = _specforge_sglang_dir(tmp_path, _drafter(target), **recorded)
    _, layers = load_eagle3(directory, target)
    assert layers == RECORDED  # SGLang's [0, 2, 6] name the outputs of decoder layers 0, 2, 6: HF ids 1, 3, 7


def test_disagreeing_vllm_and_sglang_layer_ids_are_refused(tmp_path: Path) -> None:
    target = _target()
    nested = {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [1, 3, 7]}  # = HF 2, 4, 8
    directory = _specforge_sglang_dir(
        tmp_path, _drafter(target), eagle_aux_hidden_state_layer_ids=[1, 3, 7], eagle_config=nested
    )
    with pytest.raises(DrafterLoadError) as error:
        load_eagle3(directory, target)
    message = str(error.value)
    assert " eagle_aux_hidden_state_layer_ids=[1, 3, 7]" in message
    assert "eagle_config.eagle_aux_hidden_state_layer_ids=[1, 3, 7]" in message


# ---- 5. Layer ids given to the loader, and ids that do not fit ----


def test_given_target_layers_are_used_when_the_directory_records_none(specforge_sglang) -> None:
    target, _, directory = specforge_sglang
    _, layers = load_eagle3(directory, target, target_layers=[1, 3, 7])
    assert layers == RECORDED


def test_recorded_layer_ids_win_over_given_ones(tmp_path: Path) -> None:
    target = _target()
    nested = {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [0, 2, 6]}
    directory = _specforge_sglang_dir(tmp_path, _drafter(target), eagle_config=nested)
    _, layers = load_eagle3(directory, target, target_layers=(2, 4, 5))
    assert layers == RECORDED


@pytest.mark.parametrize(
    ("recorded", "given"),
    [
        (None, (2, 4, NUM_LAYERS + 1)),  # past the last hidden state (HF ids run 0..N)
        (None, (-1, 2, 4)),
        (None, (2, 4)),  # fc reads three layers
        (None, (1, 2, 4, 5)),
        ([0, 2, NUM_LAYERS], None),  # SGLang's N = HF id N+1
    ],
    ids=["given-too-high", "given-negative", "given-two", "given-four", "recorded-too-high"],
)
def test_layer_ids_that_do_not_fit_are_refused(tmp_path: Path, recorded, given) -> None:
    target = _target()
    config = {} if recorded is None else {"eagle_config": {"eagle_aux_hidden_state_layer_ids": recorded}}
    directory = _specforge_sglang_dir(tmp_path, _drafter(target), **config)
    with pytest.raises(DrafterLoadError, match="do not fit"):
        load_eagle3(directory, target, target_layers=given)


# ---- 6. speculators: layers.0.*, its embedding (the target's), norm_before_residual ----


@pytest.fixture
def speculators(tmp_path: Path):
    target = _target()
    draft = _drafter(target, norm_before_residual=True)
    return target, draft, _speculators_dir(tmp_path / "speculators", draft, target.get_input_embeddings().weight)


def test_speculators_dir_loads_its_layers_weights_and_the_targets_embedding(speculators) -> None:
    target, _, directory = speculators
    loaded, layers = load_eagle3(directory, target)
    assert layers == RECORDED  # top-level ids, HF's meaning
    _assert_weights(loaded, load_file(directory / "model.safetensors"), torch.float32)
    assert loaded.embed_tokens is target.get_input_embeddings()


def test_speculators_norm_before_residual_is_served(speculators) -> None:
    target, draft, directory = speculators
    loaded, _ = load_eagle3(directory, target)
    assert loaded.midlayer.norm_before_residual is True
    torch.testing.assert_close(_outputs(loaded), _outputs(draft), rtol=0, atol=0)


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


@pytest.mark.parametrize("norm_before_residual", [False, True])
def test_finish_adds_the_attention_and_mlp_residuals(norm_before_residual: bool) -> None:
    layer = _drafter(_target(), norm_before_residual=norm_before_residual).midlayer
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(2, 3, HIDDEN, generator=generator)
    attended = torch.randn(2, 3, HEADS * HEAD_DIM, generator=generator)
    # by hand: residual = hidden_norm(g) (vLLM's variant) or g (EAGLE-3); o = residual + o_proj(attn)
    residual = _rms_norm(layer.hidden_norm, features) if norm_before_residual else features
    hidden = residual + attended @ layer.self_attn.o_proj.weight.T
    x = _rms_norm(layer.post_attention_layernorm, hidden)
    mlp = layer.mlp
    expected = hidden + (torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ (
        mlp.down_proj.weight.T
    )
    with torch.no_grad():
        finished = layer.finish(features, attended)
        layer.norm_before_residual = not norm_before_residual
        other = layer.finish(features, attended)
    torch.testing.assert_close(finished, expected.detach(), rtol=1e-5, atol=1e-5)
    assert (finished - other).abs().max() > 1e-2  # the flag changes the output


def test_eagle3_layer_defaults_to_eagle3s_residual() -> None:
    assert Eagle3Layer(_target().config).norm_before_residual is False


# ---- 7. Directories specdec does not serve, and telling EAGLE-3 directories apart ----


@pytest.mark.parametrize(
    ("dialect", "changes", "match"),
    [
        ("speculators", {"speculators_model_type": "eagle"}, "speculators_model_type='eagle'"),
        ("speculators", {"norm_before_fc": True}, "norm_before_fc=true"),
        ("speculators", {"layer_config": {"num_hidden_layers": 2}}, "num_hidden_layers=2"),
        ("native", {"num_hidden_layers": 2}, "num_hidden_layers=2"),
        ("native", {"eagle_config": {"use_aux_hidden_state": False}}, "use_aux_hidden_state=false"),
    ],
    ids=["speculators-eagle1", "norm-before-fc", "speculators-two-layers", "native-two-layers", "native-no-aux"],
)
def test_eagle3_variants_specdec_does_not_compute_are_refused(tmp_path: Path, dialect, changes, match) -> None:
    target = _target()
    draft = _drafter(target)
    changes = dict(changes)
    if dialect == "native":
        directory = _specforge_sglang_dir(tmp_path, draft, **changes)
    else:
        directory = _speculators_dir(tmp_path, draft, target.get_input_embeddings().weight)
        config = json.loads((directory / "config.json").read_text())
        config["transformer_layer_config"].update(changes.pop("layer_config", {}))
        _edit_config(directory, **{**config, **changes})
    with pytest.raises(DrafterLoadError, match=match):
        load_eagle3(directory, target)


def test_a_directory_of_pickled_weights_is_refused_naming_safetensors(tmp_path: Path) -> None:
    target = _target()
    (tmp_path / "config.json").write_text(json.dumps(_specforge_config()))
    torch.save(_tensors(_drafter(target)), tmp_path / "pytorch_model.bin")
    with pytest.raises(DrafterLoadError, match=r"no model\.safetensors .*found config\.json, pytorch_model\.bin"):
        load_eagle3(tmp_path, target)


def test_eagle3_dirs_are_told_from_a_plain_llama_dir(tmp_path: Path) -> None:
    target = _target()
    draft = _drafter(target)
    ours = save_eagle3(draft, tmp_path / "specdec", target_config=target.config, target_layers=RECORDED)
    native = _specforge_sglang_dir(tmp_path / "native", draft)
    speculators = _speculators_dir(tmp_path / "speculators", draft, target.get_input_embeddings().weight)
    target.config.save_pretrained(tmp_path / "llama")
    assert [is_eagle3_dir(path) for path in (ours, native, speculators)] == [True, True, True]
    assert not is_eagle3_dir(tmp_path / "llama")
    assert not is_eagle3_dir(tmp_path / "nothing")


# ---- 8. specdec's exports for the engines load back as the drafter they were written from ----


@pytest.fixture
def ours(tmp_path: Path):
    target = _target()
    draft = _drafter(target)
    return target, draft, save_eagle3(draft, tmp_path / "ours", target_config=target.config, target_layers=RECORDED)


def _assert_round_trip(target, draft, out: Path) -> None:
    loaded, layers = load_eagle3(out, target)
    assert layers == RECORDED
    _assert_weights(loaded, draft.state_dict(), torch.float32)
    torch.testing.assert_close(_outputs(loaded), _outputs(draft), rtol=0, atol=0)
    assert not [name for name in load_file(out / "model.safetensors") if "embed" in name]


def test_the_sglang_export_loads_back_with_sglangs_layer_ids(ours, tmp_path: Path) -> None:
    target, draft, directory = ours
    checkpoint = read_eagle3_dir(directory)
    write_sglang(checkpoint, checkpoint.target_layers, tmp_path / "sglang", dtype=torch.float32)
    _assert_round_trip(target, draft, tmp_path / "sglang")
    config = json.loads((tmp_path / "sglang" / "config.json").read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [i - 1 for i in RECORDED]
    assert "eagle_aux_hidden_state_layer_ids" not in config  # vLLM would read HF ids there
    assert config["rope_theta"] == ROPE_THETA  # what engines on transformers 4 read
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]


def test_the_speculators_export_loads_back_with_hf_layer_ids(ours, tmp_path: Path) -> None:
    target, draft, directory = ours
    checkpoint = read_eagle3_dir(directory)
    write_speculators(
        checkpoint,
        checkpoint.target_layers,
        tmp_path / "speculators",
        dtype=torch.float32,
        verifier="org/target",
        verifier_architectures=["LlamaForCausalLM"],
        speculative_tokens=3,
        speculators_version="0.9.0",
    )
    _assert_round_trip(target, draft, tmp_path / "speculators")
    config = json.loads((tmp_path / "speculators" / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == list(RECORDED)
    assert config["transformer_layer_config"]["rope_theta"] == ROPE_THETA
    assert config["speculators_model_type"] == "eagle3"
    assert config["norm_before_residual"] is False  # written out: vLLM reads a missing one as true
    names = set(load_file(tmp_path / "speculators" / "model.safetensors"))
    assert {f"layers.0.{key}" for key in LAYER_KEYS} <= names
    assert not [name for name in names if name.startswith("midlayer.")]


# ---- RoPE scaling recorded the transformers-4 way (SGLang's and speculators' configs) ----

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so the tiny head's low frequencies are rescaled
}


@pytest.mark.parametrize("dialect", ["native", "speculators"])
def test_a_recorded_rope_scaling_is_served(tmp_path: Path, dialect: str) -> None:
    """ecosystem.md 1a's native config of a Llama-3.1 drafter (`rope_theta` and `rope_scaling`, no
    `rope_parameters`), and a speculators transformer_layer_config written on transformers 4."""
    target = _target()
    draft = _drafter(target)
    rope = {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}
    if dialect == "native":
        config = {name: value for name, value in _specforge_config().items() if name != "rope_parameters"}
        directory = _write(tmp_path, {**config, **rope}, _tensors(draft))
    else:
        directory = _speculators_dir(tmp_path, draft, target.get_input_embeddings().weight)
        config = json.loads((directory / "config.json").read_text())
        _edit_config(directory, transformer_layer_config={**config["transformer_layer_config"], **rope})
    loaded, _ = load_eagle3(directory, target)
    sizes = {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "head_dim": HEAD_DIM}
    expected = LlamaRotaryEmbedding(LlamaConfig(**sizes, max_position_embeddings=MAX_POSITIONS, **rope)).inv_freq
    unscaled = LlamaRotaryEmbedding(LlamaConfig(**sizes, rope_theta=rope["rope_theta"])).inv_freq
    assert not torch.equal(expected, unscaled)  # the scaling changes this head's frequencies
    assert torch.equal(loaded.rotary_emb.inv_freq, expected)
