from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from specdec.data_prep import (
    DType,
    TargetConfig,
    TargetLoadError,
    asset_path,
    check_same_tokenizer,
    load_target,
    load_tokenizer,
)
from tests.conftest import TINY_WORDS, make_tiny_llama, make_tiny_tokenizer


def test_local_directory_loads_frozen_in_eval_mode_with_its_weights(tiny_llama_dir: Path) -> None:
    target = load_target(TargetConfig(path=str(tiny_llama_dir)))
    assert not target.model.training
    assert not any(p.requires_grad for p in target.model.parameters())
    input_ids = torch.tensor([[1, 3, 10, 11, 2]])
    expected = make_tiny_llama()(input_ids).logits
    torch.testing.assert_close(target.model(input_ids).logits, expected, rtol=0, atol=0)
    assert target.tokenizer.get_vocab() == make_tiny_tokenizer().get_vocab()
    assert target.reference == str(tiny_llama_dir)


def test_dtype_is_applied(tiny_llama_dir: Path) -> None:
    target = load_target(TargetConfig(path=str(tiny_llama_dir), dtype=DType.bfloat16))
    assert {p.dtype for p in target.model.parameters()} == {torch.bfloat16}


def test_missing_local_path_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"target.path=\S+/nope does not exist"):
        load_target(TargetConfig(path=str(tmp_path / "nope")))


def test_a_model_directory_without_tokenizer_files_is_refused_with_the_key_and_where_they_are(tmp_path: Path) -> None:
    make_tiny_llama().save_pretrained(tmp_path)  # what specdec-train saves as a PARD drafter: no tokenizer
    with pytest.raises(TargetLoadError, match=r"draft.init=\S+: no tokenizer loads from it .* its export"):
        load_tokenizer(TargetConfig(path=str(tmp_path)), key="draft.init")


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(TargetLoadError, match=r"not a \.gguf file"):
        load_target(TargetConfig(path=str(tmp_path / "model.bin")))


def test_hub_id_offline_says_how_to_use_a_local_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TargetLoadError) as error:
        load_target(TargetConfig(path="meta-llama/Llama-3.1-8B-Instruct", revision="v1"))
    message = str(error.value)
    assert "target.path=meta-llama/Llama-3.1-8B-Instruct (revision v1) is a Hub id" in message
    assert "hf download meta-llama/Llama-3.1-8B-Instruct --revision v1 --local-dir DIR" in message
    assert "set target.path=DIR" in message


def test_random_init_overrides_the_architecture_with_seeded_weights(tiny_llama_dir: Path) -> None:
    cfg = TargetConfig(path=str(tiny_llama_dir), random_init={"num_hidden_layers": 1, "hidden_size": 16})
    first, again, other = (load_target(cfg, seed=s).model for s in (0, 0, 1))
    assert first.config.num_hidden_layers == 1 and first.config.hidden_size == 16
    pretrained = make_tiny_llama().state_dict()
    weights = first.state_dict()
    assert "model.layers.1.mlp.up_proj.weight" in pretrained and "model.layers.1.mlp.up_proj.weight" not in weights
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, again.state_dict()[name], rtol=0, atol=0)
    assert not torch.equal(weights["model.embed_tokens.weight"], other.state_dict()["model.embed_tokens.weight"])


def test_random_init_with_an_unknown_field_is_refused(tiny_llama_dir: Path) -> None:
    cfg = TargetConfig(path=str(tiny_llama_dir), random_init={"num_layerz": 1})
    with pytest.raises(TargetLoadError, match="does not have: num_layerz"):
        load_target(cfg)


def test_tokenizers_that_disagree_are_refused_with_the_tokens_named() -> None:
    swapped = [*TINY_WORDS[:6], TINY_WORDS[7], TINY_WORDS[6], *TINY_WORDS[8:]]
    with pytest.raises(TargetLoadError) as error:
        check_same_tokenizer(make_tiny_tokenizer(), make_tiny_tokenizer(swapped), target_name="t", draft_name="d")
    assert "2 tokens have other ids ('w0' is id 6 in the target, 'w1' is id 7 in the target)" in str(error.value)
    check_same_tokenizer(make_tiny_tokenizer(), make_tiny_tokenizer(), target_name="t", draft_name="d")


@pytest.mark.slow
def test_smollm2_gguf_answers_a_chat_prompt_greedily_and_deterministically() -> None:
    target = load_target(TargetConfig(path=str(asset_path("smollm2_gguf"))))
    assert target.model.config.num_hidden_layers == 30 and target.model.config.hidden_size == 576
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = target.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    answers = []
    for _ in range(2):
        output = target.model.generate(**prompt, max_new_tokens=16, do_sample=False)
        answers.append(output[0, prompt["input_ids"].shape[1] :].tolist())
    assert answers[0] == answers[1]
    text = target.tokenizer.decode(answers[0], skip_special_tokens=True)
    assert "Paris" in text, text  # random or mis-dequantized weights would not know
