import json
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from specdec.data_prep import DataConfig, SourceError, Turn, asset_path, read_conversations, sources
from specdec.data_prep.sources import OnBadRow, SourceFormat

SHAREGPT_ROWS = [
    {"id": "a", "conversations": [{"from": "human", "value": "Hi ü"}, {"from": "gpt", "value": "Hello"}]},
    {"id": "b", "conversations": [{"from": "system", "value": "Be brief"}, {"from": "human", "value": "2+2?"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "Why?"}, {"from": "chatgpt", "value": "Because."}]},
]


def _write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def test_sharegpt_roles_are_normalised(tmp_path: Path) -> None:
    data = read_conversations(DataConfig(path=str(_write_json(tmp_path / "s.json", SHAREGPT_ROWS))))
    assert [c.id for c in data.conversations] == ["a", "b", "c"]
    assert data.conversations[0].turns == (Turn("user", "Hi ü"), Turn("assistant", "Hello"))
    assert [t.role for t in data.conversations[1].turns] == ["system", "user"]
    assert data.conversations[2].turns[1] == Turn("assistant", "Because.")
    assert data.skipped_ids == [] and data.truncated_at_byte is None


def test_a_file_cut_mid_record_is_refused_unless_allowed_and_the_cut_is_located(tmp_path: Path) -> None:
    whole = json.dumps(SHAREGPT_ROWS, indent=2, ensure_ascii=False).encode()
    third = whole.index(b'"id": "c"')
    cut = whole[: third + 30]  # inside the third record
    path = tmp_path / "cut.json"
    path.write_bytes(cut)
    start_of_third = whole.rindex(b"{", 0, third)
    with pytest.raises(SourceError) as error:
        read_conversations(DataConfig(path=str(path)))
    assert f"cut off mid-record at byte {start_of_third}, after 2 complete records" in str(error.value)
    assert "data.allow_truncated=true" in str(error.value)
    data = read_conversations(DataConfig(path=str(path), allow_truncated=True))
    assert [c.id for c in data.conversations] == ["a", "b"]
    assert data.truncated_at_byte == start_of_third  # bytes, not characters: "ü" is two bytes


def test_bad_json_inside_a_cut_file_is_an_error_even_when_truncation_is_allowed(tmp_path: Path) -> None:
    text = json.dumps(SHAREGPT_ROWS, indent=2).replace('"id": "b",', '"id": "b" "oops",')[:-40]
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(SourceError, match=r"invalid JSON in record 1 \(byte \d+\)"):
        read_conversations(DataConfig(path=str(tmp_path / "bad.json"), allow_truncated=True))


def test_stopping_at_max_samples_never_reaches_the_cut(tmp_path: Path) -> None:
    whole = json.dumps(SHAREGPT_ROWS, indent=2).encode()
    (tmp_path / "cut.json").write_bytes(whole[:-20])
    data = read_conversations(DataConfig(path=str(tmp_path / "cut.json"), max_samples=2))
    assert [c.id for c in data.conversations] == ["a", "b"]


def test_a_malformed_row_is_reported_with_file_row_and_id(tmp_path: Path) -> None:
    rows = [*SHAREGPT_ROWS[:2], {"id": "bad", "conversations": [{"from": "robot", "value": "x"}]}]
    path = _write_json(tmp_path / "s.json", rows)
    with pytest.raises(SourceError) as error:
        read_conversations(DataConfig(path=str(path)))
    assert str(error.value).startswith(
        f"{path}: row 2 (id bad): turn 0 has from='robot'; expected one of human, user, gpt"
    )
    assert "data.on_bad_row=skip" in str(error.value)
    data = read_conversations(DataConfig(path=str(path), on_bad_row=OnBadRow.skip))
    assert [c.id for c in data.conversations] == ["a", "b"] and data.skipped_ids == ["row2:bad"]


def test_messages_jsonl_with_a_broken_line_names_the_line(tmp_path: Path) -> None:
    good = {"id": "m1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + "{not json\n" + json.dumps({**good, "id": "m2"}) + "\n")
    with pytest.raises(SourceError, match="line 3 is not valid JSON"):
        read_conversations(DataConfig(path=str(path)))
    data = read_conversations(DataConfig(path=str(path), on_bad_row=OnBadRow.skip))
    assert [c.id for c in data.conversations] == ["m1", "m2"]
    assert data.conversations[0].turns == (Turn("user", "q"), Turn("assistant", "a"))


def test_ultrachat_data_lists_alternate_user_and_assistant(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"id": 7, "data": ["q1", "a1", "q2", "a2"]}) + "\n")
    (conversation,) = read_conversations(DataConfig(path=str(path))).conversations
    assert conversation.id == "7"
    assert [t.role for t in conversation.turns] == ["user", "assistant", "user", "assistant"]


def test_parquet_with_messages(tmp_path: Path) -> None:
    rows = [{"prompt_id": "p1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (conversation,) = read_conversations(DataConfig(path=str(tmp_path / "d.parquet"))).conversations
    assert conversation.id == "p1" and conversation.turns[1] == Turn("assistant", "a")


def test_an_explicit_format_that_does_not_match_is_a_bad_row(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "s.json", SHAREGPT_ROWS)
    with pytest.raises(SourceError, match=r"row 0 \(id a\): expected an object with a 'messages' list"):
        read_conversations(DataConfig(path=str(path), format=SourceFormat.messages))


def test_an_unreachable_dataset_name_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match=r"data\.path=someone/no-such-dataset is neither a local file nor a dataset"):
        read_conversations(DataConfig(path="someone/no-such-dataset"))


def test_a_missing_local_file_is_named() -> None:
    with pytest.raises(SourceError, match=r"data.path=/no/such/file.json does not exist"):
        read_conversations(DataConfig(path="/no/such/file.json"))


def test_the_sharegpt_wheel_is_cut_after_17671_records() -> None:
    path = str(asset_path("sharegpt"))
    with pytest.raises(SourceError, match="cut off mid-record at byte 125506645, after 17671 complete records"):
        read_conversations(DataConfig(path=path))
    data = read_conversations(DataConfig(path=path, allow_truncated=True))
    assert len(data.conversations) == 17671 and data.conversations[0].id == "QWJhYvA_0"


def test_max_turns_keeps_the_system_prompt_and_the_first_turns_from_the_first_question(tmp_path: Path) -> None:
    row = {
        "id": "long",
        "conversations": [
            {"from": "gpt", "value": "...continued"},  # an orphan answer from a split record
            {"from": "system", "value": "Be brief"},
            *[{"from": "human" if i % 2 == 0 else "gpt", "value": f"turn {i}"} for i in range(5)],
        ],
    }
    path = str(_write_json(tmp_path / "s.json", [row]))
    kept = read_conversations(DataConfig(path=path, max_turns=2)).conversations[0].turns
    assert kept == (Turn("system", "Be brief"), Turn("user", "turn 0"), Turn("assistant", "turn 1"))
    assert len(read_conversations(DataConfig(path=path)).conversations[0].turns) == 7


def test_a_jsonl_line_that_is_not_utf8_is_a_bad_row_named_with_its_byte(tmp_path: Path) -> None:
    good = {"id": "m1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    first = (json.dumps(good) + "\n").encode()
    latin1 = json.dumps({**good, "id": "m2"}).replace('"q"', '"café"').encode("latin-1") + b"\n"
    path = tmp_path / "m.jsonl"
    path.write_bytes(first + latin1 + (json.dumps({**good, "id": "m3"}) + "\n").encode())
    offset = len(first) + latin1.index(b"\xe9")
    with pytest.raises(SourceError) as error:
        read_conversations(DataConfig(path=str(path)))
    assert str(error.value).startswith(
        f"{path}: row 1 (id ?): line 2 is not valid UTF-8: byte {offset} is b'\\xe9'. Fix or remove the row"
    )
    data = read_conversations(DataConfig(path=str(path), on_bad_row=OnBadRow.skip))
    assert [c.id for c in data.conversations] == ["m1", "m3"] and data.skipped_ids == ["row1:?"]


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 1 << 23])  # small chunks cut "ü" and "é" apart
def test_a_sharegpt_record_that_is_not_utf8_is_named_with_its_byte(tmp_path: Path, chunk_bytes: int) -> None:
    whole = json.dumps(SHAREGPT_ROWS, indent=2, ensure_ascii=False).encode()
    latin1 = whole.replace(b"Be brief", "Be brïef".encode("latin-1"))
    path = tmp_path / "s.json"
    path.write_bytes(latin1)
    offset = latin1.index(b"\xef")
    expected = f"{path}: record 1 is not valid UTF-8: byte {offset} is b'\\xef'. Save the file as UTF-8"
    with pytest.raises(SourceError) as error:
        list(sources._json_array_rows(path, chunk_bytes=chunk_bytes))
    assert str(error.value).startswith(expected)
    path.write_bytes(whole)  # the same file in UTF-8 reads whole at every chunk size
    assert list(sources._json_array_rows(path, chunk_bytes=chunk_bytes)) == SHAREGPT_ROWS
    path.write_bytes(whole[: whole.index("ü".encode()) + 1])  # cut inside "ü": a cut record, not bad UTF-8
    with pytest.raises(sources._Truncated):
        list(sources._json_array_rows(path, chunk_bytes=chunk_bytes))


def test_read_conversations_names_the_sharegpt_record_that_is_not_utf8(tmp_path: Path) -> None:
    whole = json.dumps(SHAREGPT_ROWS, indent=2, ensure_ascii=False).encode()
    latin1 = whole.replace(b"Because.", "Parce que ça.".encode("latin-1"))
    path = tmp_path / "s.json"
    path.write_bytes(latin1)
    offset = latin1.index("ç".encode("latin-1"))
    with pytest.raises(SourceError) as error:
        read_conversations(DataConfig(path=str(path)))
    assert str(error.value).startswith(f"{path}: record 2 is not valid UTF-8: byte {offset} is b'\\xe7'.")
