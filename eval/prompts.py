"""Held-out prompts that tau is measured on, rendered with the target's chat template.

mtbench    the first turn of MT-Bench's 80 questions (the FastChat file EAGLE and SGLang use)
humaneval  HumanEval's 164 function stubs, asked as "complete this function"
sharegpt   first user turns of the last records of the ShareGPT file (training reads from the front)
FILE       a jsonl file with one of "prompt" (text), "turns" (list of user turns) or "messages"
"""

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from specdec.data_prep import DataConfig, asset_path, read_conversations


@dataclass(frozen=True)
class Prompt:
    id: str
    token_ids: list[int]


class PromptError(ValueError):
    pass


def _mtbench(count: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in asset_path("mtbench").read_text().splitlines() if line.strip()]
    return [(f"mtbench-{row['question_id']}", row["turns"][0]) for row in rows[:count]]


def _humaneval(count: int) -> list[tuple[str, str]]:
    with gzip.open(asset_path("humaneval"), "rt") as file:
        rows = [json.loads(line) for line in file if line.strip()]
    return [
        (row["task_id"], f"Complete the following Python function.\n\n```python\n{row['prompt']}```")
        for row in rows[:count]
    ]


def _sharegpt(count: int) -> list[tuple[str, str]]:
    data = read_conversations(DataConfig(path=str(asset_path("sharegpt")), allow_truncated=True))
    prompts = []
    for conversation in reversed(data.conversations):
        if conversation.turns and conversation.turns[0].role == "user" and conversation.turns[0].content.strip():
            prompts.append((f"sharegpt-{conversation.id}", conversation.turns[0].content))
        if len(prompts) == count:
            break
    return prompts


def _jsonl(path: Path, count: int) -> list[tuple[str, str]]:
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" in row:
            text = row["prompt"]
        elif "turns" in row:
            text = row["turns"][0]
        elif "messages" in row:
            text = next((m["content"] for m in row["messages"] if m.get("role") == "user"), None)
        else:
            text = None
        if not isinstance(text, str):
            raise PromptError(f"{path}: line {number} has no 'prompt', 'turns' or user 'messages' text.")
        prompts.append((str(row.get("id", row.get("question_id", f"line{number}"))), text))
        if len(prompts) == count:
            break
    return prompts


BENCHES = {"mtbench": _mtbench, "humaneval": _humaneval, "sharegpt": _sharegpt}


def load_prompts(
    bench: str, tokenizer: PreTrainedTokenizerBase, *, num_prompts: int, chat_template: str | None = None
) -> list[Prompt]:
    if bench in BENCHES:
        texts = BENCHES[bench](num_prompts)
    elif Path(bench).is_file():
        texts = _jsonl(Path(bench), num_prompts)
    else:
        raise PromptError(
            f"eval.bench={bench} is neither one of {', '.join(BENCHES)} nor an existing jsonl file of prompts."
        )
    prompts = []
    for prompt_id, text in texts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], chat_template=chat_template, add_generation_prompt=True, tokenize=True
        )
        prompts.append(Prompt(prompt_id, list(ids["input_ids"] if hasattr(ids, "keys") else ids)))
    return prompts
