"""Render a conversation with the target's chat template and mark the tokens the drafter learns.

The loss mask is 1 exactly on assistant tokens, found from the template's own output: the
assistant span of turn i is what rendering turns[:i+1] adds to rendering turns[:i] with the
generation prompt, so it holds the answer and the template's end-of-turn marker but never the
role header. Character spans map to tokens through the tokenizer's offsets, so no token id is
guessed; a token that straddles the end of an answer counts, since the target emits it there.
"""

from dataclasses import dataclass

import numpy as np
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from specdec.data_prep.sources import Conversation


@dataclass(frozen=True)
class Sample:
    id: str
    input_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] bool; True on assistant tokens


class TemplateError(ValueError):
    pass


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str | None, *, prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=prompt)


def _without_orphan_answers(conversation: Conversation) -> list[dict]:
    """Messages minus the answers that come before any user turn: ShareGPT splits long chats into
    records whose first turn answers a question in the previous record, and most chat templates
    cannot render an answer with no question (the same rule as SpecForge's preprocessing)."""
    messages, seen_user = [], False
    for turn in conversation.turns:
        seen_user = seen_user or turn.role == "user"
        if turn.role == "assistant" and not seen_user:
            continue
        messages.append({"role": turn.role, "content": turn.content})
    return messages


def render_with_spans(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, chat_template: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of its assistant turns."""
    messages = _without_orphan_answers(conversation)
    if not messages:  # answers only: nothing to learn from; the caller counts it as dropped
        return "", []
    text = _render(tokenizer, messages, chat_template, prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], chat_template, prompt=True)
        after = _render(tokenizer, messages[: index + 1], chat_template, prompt=False)
        # Both must be prefixes of the whole text, or the span would point at other characters.
        if not (after.startswith(before) and text.startswith(after)):
            raise TemplateError(
                f"conversation {conversation.id}, turn {index}: the chat template renders the conversation "
                "up to this answer differently once more turns follow (it rewrites history), so the "
                "answer's tokens cannot be found. Set data.chat_template to a template that appends turns."
            )
        spans.append((len(before), len(after)))
    return text, spans


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, *, max_length: int, chat_template: str | None = None
) -> Sample:
    """Token ids and the assistant-only loss mask, cut to `max_length` tokens."""
    text, spans = render_with_spans(tokenizer, conversation, chat_template)
    if not text:
        return Sample(conversation.id, np.zeros(0, dtype=np.int32), np.zeros(0, dtype=bool))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = np.asarray(encoded["input_ids"][:max_length], dtype=np.int32)
    starts = np.asarray([start for start, _ in encoded["offset_mapping"][:max_length]], dtype=np.int64)
    ends = np.asarray([end for _, end in encoded["offset_mapping"][:max_length]], dtype=np.int64)
    loss_mask = np.zeros(len(input_ids), dtype=bool)
    for span_start, span_end in spans:
        loss_mask |= (starts < span_end) & (ends > span_start) & (ends > starts)
    return Sample(conversation.id, input_ids, loss_mask)
