"""Golden ids and loss masks per chat template and case. A change to a mask shows up as a diff of
tests/data_prep/goldens/<template>_<case>.json, whose `marked` field is the rendered text with the
loss-bearing spans in [[...]]. Regenerate with `pytest --update-goldens` and review the diff."""

import json
from pathlib import Path

import numpy as np
import pytest

from specdec.data_prep import Conversation, TemplateError, Turn, tokenize_conversation
from specdec.data_prep.templates import render_with_spans

GOLDENS = Path(__file__).parent / "goldens"

# The shape of Llama-3's template (headers and <|eot_id|>), without its date preamble.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TEMPLATES = {"smollm2": None, "llama3": LLAMA3_TEMPLATE}
CASES = {
    "single": Conversation("single", (Turn("user", "What is 2+2?"), Turn("assistant", "2+2 is 4."))),
    "multi_turn_system": Conversation(
        "multi",
        (
            Turn("system", "Answer briefly."),
            Turn("user", "Name a prime."),
            Turn("assistant", "7"),
            Turn("user", "And an even one?"),
            Turn("assistant", "2, the only even prime."),
        ),
    ),
    # ShareGPT splits long chats; a record opening with an answer has lost its question.
    "orphan_answer_first": Conversation(
        "orphan", (Turn("assistant", "...continued."), Turn("user", "Thanks!"), Turn("assistant", "You're welcome."))
    ),
}


def _marked(text: str, offsets: list[tuple[int, int]], mask: np.ndarray) -> str:
    """The text with every run of loss-bearing tokens wrapped in [[...]]."""
    runs: list[list[int]] = []
    for index, ((start, end), masked) in enumerate(zip(offsets, mask, strict=True)):
        if masked and index > 0 and mask[index - 1]:
            runs[-1][1] = end
        elif masked:
            runs.append([start, end])
    pieces, cursor = [], 0
    for start, end in runs:
        pieces += [text[cursor:start], "[[", text[start:end], "]]"]
        cursor = end
    return "".join([*pieces, text[cursor:]])


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_ids_and_mask_match_the_golden(template: str, case: str, smollm2_tokenizer, update_goldens: bool) -> None:
    chat_template = TEMPLATES[template]
    sample = tokenize_conversation(smollm2_tokenizer, CASES[case], max_length=4096, chat_template=chat_template)
    text, _ = render_with_spans(smollm2_tokenizer, CASES[case], chat_template)
    offsets = smollm2_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    golden = {
        "marked": _marked(text, offsets, sample.loss_mask),
        "input_ids": sample.input_ids.tolist(),
        "loss_mask": sample.loss_mask.astype(int).tolist(),
    }
    path = GOLDENS / f"{template}_{case}.json"
    if update_goldens:
        path.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    assert golden == json.loads(path.read_text())


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_ids_are_the_templates_own_tokenization(template: str, smollm2_tokenizer) -> None:
    conversation = CASES["multi_turn_system"]
    sample = tokenize_conversation(smollm2_tokenizer, conversation, max_length=4096, chat_template=TEMPLATES[template])
    messages = [{"role": t.role, "content": t.content} for t in conversation.turns]
    expected = smollm2_tokenizer.apply_chat_template(messages, chat_template=TEMPLATES[template], tokenize=True)
    assert sample.input_ids.tolist() == list(expected["input_ids"])


def test_the_mask_covers_each_answer_and_its_end_marker_only(smollm2_tokenizer) -> None:
    sample = tokenize_conversation(smollm2_tokenizer, CASES["multi_turn_system"], max_length=4096)
    runs, current = [], []
    for token_id, masked in zip(sample.input_ids.tolist(), sample.loss_mask, strict=True):
        if masked:
            current.append(token_id)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    assert [smollm2_tokenizer.decode(run) for run in runs] == ["7<|im_end|>\n", "2, the only even prime.<|im_end|>\n"]


def test_truncation_keeps_the_first_tokens(smollm2_tokenizer) -> None:
    whole = tokenize_conversation(smollm2_tokenizer, CASES["multi_turn_system"], max_length=4096)
    cut = tokenize_conversation(smollm2_tokenizer, CASES["multi_turn_system"], max_length=40)
    assert len(cut.input_ids) == 40
    np.testing.assert_array_equal(cut.input_ids, whole.input_ids[:40])
    np.testing.assert_array_equal(cut.loss_mask, whole.loss_mask[:40])


def test_a_template_that_rewrites_history_is_refused(smollm2_tokenizer) -> None:
    # Drops earlier answers from the history, as some reasoning-model templates do with thoughts.
    rewriting = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(TemplateError, match="renders the conversation up to this answer differently"):
        tokenize_conversation(smollm2_tokenizer, CASES["multi_turn_system"], max_length=4096, chat_template=rewriting)


def test_a_record_of_answers_only_gives_an_empty_sample(smollm2_tokenizer) -> None:
    # ShareGPT has records that are one answer, continued from the previous record.
    conversation = Conversation("answers-only", (Turn("assistant", "...and that is all."),))
    sample = tokenize_conversation(smollm2_tokenizer, conversation, max_length=64)
    assert len(sample.input_ids) == 0 and not sample.loss_mask.any()  # prepare_cache counts it as dropped
