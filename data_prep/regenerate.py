"""Let the target rewrite every assistant turn, so the drafter learns the target's own answers
(SpecForge reports about +10% acceptance from this). Turn by turn, each new answer is generated
from the user turns and the target's earlier answers, batched across conversations (left padding).
Chunks of conversations are written as jsonl under a temporary name and renamed, so a killed run
resumes at the first missing chunk; sampling is seeded per chunk, so a resumed run writes the same.
Each rank writes its own chunks, then waits for the others' (and names them if they never come).
"""

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specdec.data_prep.cache import CacheError, atomic_write, remove_dead_writers_files
from specdec.data_prep.padding import pad
from specdec.data_prep.sources import Conversation, Turn
from specdec.data_prep.target import Target

log = logging.getLogger(__name__)

CHUNK_POLL_S = 5.0
# How long a rank waits, once its own chunks are done, without any other rank's chunk appearing. A
# chunk (64 conversations) takes minutes on a GPU, so an hour without one means a rank has died.
CHUNK_WAIT_TIMEOUT_S = 3600.0


def _rewritable(turns: tuple[Turn, ...] | list[Turn], start: int = 0) -> list[int]:
    """Indices of the answers that follow a user turn: the ones a target can be asked to rewrite."""
    first_user = next((i for i, turn in enumerate(turns) if turn.role == "user"), len(turns))
    return [i for i in range(max(start, first_user), len(turns)) if turns[i].role == "assistant"]


def _generate(
    target: Target, prompts: list[str], *, max_new_tokens: int, temperature: float, batch_size: int
) -> list[str]:
    tokenizer = target.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Batches of similar length: a long prompt makes every row of its batch attend over its padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        rows = order[start : start + batch_size]
        token_ids = tokenizer([prompts[i] for i in rows], add_special_tokens=False)["input_ids"]
        input_ids, attention_mask = pad(token_ids, side="left", value=pad_id)  # generation continues at the right
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        )
        with torch.inference_mode():
            output = target.model.generate(
                **{name: tensor.to(target.model.device) for name, tensor in batch.items()},
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                **sampling,
            )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        for row, answer in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
            answers[row] = answer
    return answers


def _regenerate_chunk(
    target: Target,
    chunk: list[Conversation],
    *,
    chat_template: str | None,
    max_prompt_tokens: int | None,
    progress_bar,
    **generation,
) -> list[Conversation]:
    turns = [list(conversation.turns) for conversation in chunk]
    position = [0] * len(chunk)  # next turn to look at, per conversation
    while True:
        # Per conversation, its next answer to rewrite; earlier answers are already the target's.
        todo = {c: rewritable[0] for c in range(len(chunk)) if (rewritable := _rewritable(turns[c], position[c]))}
        if not todo:
            return [replace(conversation, turns=tuple(turns[c])) for c, conversation in enumerate(chunk)]
        prompts = {
            c: target.tokenizer.apply_chat_template(
                [{"role": x.role, "content": x.content} for x in turns[c][:t]],
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=True,
            )
            for c, t in todo.items()
        }
        if max_prompt_tokens is not None:
            # An answer after max_prompt_tokens is cut from the sample anyway (data.max_length), and so
            # is everything after it: those answers stay as they are.
            for c in list(todo):
                if len(target.tokenizer(prompts[c], add_special_tokens=False)["input_ids"]) >= max_prompt_tokens:
                    position[c] = len(turns[c])
                    del todo[c], prompts[c]
        answers = _generate(target, list(prompts.values()), **generation)
        for (c, t), answer in zip(todo.items(), answers, strict=True):
            turns[c][t] = Turn("assistant", answer.strip())
            position[c] = t + 1
        progress_bar.update(len(todo))


def regenerate_answers(
    target: Target,
    conversations: list[Conversation],
    *,
    out_dir: Path,
    max_new_tokens: int,
    temperature: float,
    chat_template: str | None = None,
    max_prompt_tokens: int | None = None,
    seed: int = 0,
    chunk_size: int = 64,
    batch_size: int = 8,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    wait_timeout_s: float = CHUNK_WAIT_TIMEOUT_S,
) -> list[Conversation]:
    """The conversations with every answer rewritten by the target; resumable through `out_dir`.
    Rank r of w rewrites the chunks whose index is r mod w, then reads the others' from disk."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_files(out_dir)
    chunks = [conversations[start : start + chunk_size] for start in range(0, len(conversations), chunk_size)]
    mine = range(rank, len(chunks), world)
    answers = sum(len(_rewritable(conversation.turns)) for index in mine for conversation in chunks[index])
    bar = tqdm(total=answers, desc=f"regenerating answers [rank {rank}/{world}]", unit="turn", disable=not progress)
    for index in mine:
        path = out_dir / f"chunk-{index:05d}.jsonl"
        if _read_chunk(path, chunks[index]) is not None:
            bar.update(sum(len(_rewritable(conversation.turns)) for conversation in chunks[index]))
            continue
        torch.manual_seed(seed + index)
        rewritten = _regenerate_chunk(
            target,
            chunks[index],
            chat_template=chat_template,
            max_prompt_tokens=max_prompt_tokens,
            progress_bar=bar,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            batch_size=batch_size,
        )
        lines = [json.dumps({"id": c.id, "turns": [[t.role, t.content] for t in c.turns]}) for c in rewritten]
        atomic_write(path, ("\n".join(lines) + "\n").encode())
    bar.close()
    return _collect_chunks(out_dir, chunks, world=world, wait_timeout_s=wait_timeout_s)


def _collect_chunks(
    out_dir: Path, chunks: list[list[Conversation]], *, world: int, wait_timeout_s: float
) -> list[Conversation]:
    """Every chunk, in order, once the other ranks have written theirs; raises when none of the
    missing chunks appears for `wait_timeout_s` (a rank that died would be waited for forever)."""
    done: dict[int, list[Conversation]] = {}
    last_progress = time.monotonic()
    while True:
        for index in [index for index in range(len(chunks)) if index not in done]:
            rewritten = _read_chunk(out_dir / f"chunk-{index:05d}.jsonl", chunks[index])
            if rewritten is not None:
                done[index], last_progress = rewritten, time.monotonic()
        missing = [index for index in range(len(chunks)) if index not in done]
        if not missing:
            return [conversation for index in range(len(chunks)) for conversation in done[index]]
        waited_s = time.monotonic() - last_progress
        if waited_s > wait_timeout_s:
            names = ", ".join(f"chunk-{index:05d}.jsonl" for index in missing[:8])
            more = ", ..." if len(missing) > 8 else ""
            ranks = ", ".join(str(rank) for rank in sorted({index % world for index in missing}))
            raise CacheError(
                f"{out_dir}: {len(missing)} of {len(chunks)} chunks of regenerated answers ({names}{more}), to be "
                f"written by rank(s) {ranks}, have not appeared for {waited_s:.0f} s: that rank has probably died. "
                "Rerun `specdec-prep` with the same recipe on all ranks: the chunks already written are kept and "
                "only the missing ones are generated."
            )
        log.info("waiting for %d chunks of other ranks in %s", len(missing), out_dir)
        time.sleep(min(CHUNK_POLL_S, wait_timeout_s))


def _read_chunk(path: Path, chunk: list[Conversation]) -> list[Conversation] | None:
    """A chunk written earlier for these very conversations, or None."""
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if [row["id"] for row in rows] != [conversation.id for conversation in chunk]:
        log.warning("%s holds other conversations than this run's; it is rewritten", path)
        path.unlink()
        return None
    return [Conversation(row["id"], tuple(Turn(*turn) for turn in row["turns"])) for row in rows]
