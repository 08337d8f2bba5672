import json
from pathlib import Path

import pytest

from specdec.eval.prompts import PromptError, load_prompts


def test_mtbench_first_turns_through_the_chat_template(smollm2_tokenizer) -> None:
    prompts = load_prompts("mtbench", smollm2_tokenizer, num_prompts=80)
    assert len(prompts) == 80 and prompts[0].id == "mtbench-81"
    text = smollm2_tokenizer.decode(prompts[0].token_ids)
    assert "Compose an engaging travel blog post about a recent trip to Hawaii" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_humaneval_and_sharegpt(smollm2_tokenizer) -> None:
    (humaneval,) = load_prompts("humaneval", smollm2_tokenizer, num_prompts=1)
    assert humaneval.id == "HumanEval/0" and "def has_close_elements" in smollm2_tokenizer.decode(humaneval.token_ids)
    sharegpt = load_prompts("sharegpt", smollm2_tokenizer, num_prompts=3)
    assert len(sharegpt) == 3 and all(p.id.startswith("sharegpt-") for p in sharegpt)


def test_a_jsonl_file_of_prompts(tmp_path: Path, smollm2_tokenizer) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "x", "prompt": "Hello"}) + "\n" + json.dumps({"turns": ["Hi", "again"]}) + "\n")
    assert [p.id for p in load_prompts(str(path), smollm2_tokenizer, num_prompts=5)] == ["x", "line2"]
    path.write_text(json.dumps({"text": "no prompt key"}) + "\n")
    with pytest.raises(PromptError, match="line 1 has no 'prompt', 'turns' or user 'messages' text"):
        load_prompts(str(path), smollm2_tokenizer, num_prompts=5)


def test_an_unknown_bench_is_named() -> None:
    with pytest.raises(PromptError, match="eval.bench=gsm9k is neither one of mtbench, humaneval, sharegpt"):
        load_prompts("gsm9k", None, num_prompts=1)
