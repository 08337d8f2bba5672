import socket
import subprocess
import sys
from pathlib import Path

import pytest

from specdec.data_prep import CacheError, Conversation, TargetConfig, Turn, load_target
from specdec.data_prep import regenerate as regenerate_module
from specdec.data_prep.regenerate import regenerate_answers

CONVERSATIONS = [
    Conversation("a", (Turn("user", "w1 w2"), Turn("assistant", "w3"), Turn("user", "w4"), Turn("assistant", "w5"))),
    Conversation("b", (Turn("assistant", "orphan"), Turn("user", "w6"), Turn("assistant", "w7 w8"))),
    Conversation("c", (Turn("system", "w9"), Turn("user", "w10"), Turn("assistant", "w11"))),
]


@pytest.fixture
def tiny_target(tiny_llama_dir: Path):
    return load_target(TargetConfig(path=str(tiny_llama_dir)))


def _regenerate(target, out_dir: Path, temperature: float = 0.0):
    return regenerate_answers(
        target, CONVERSATIONS, out_dir=out_dir, max_new_tokens=3, temperature=temperature, chunk_size=2, progress=False
    )


def test_every_answer_after_a_question_is_rewritten_by_the_target(tiny_target, tmp_path: Path) -> None:
    result = _regenerate(tiny_target, tmp_path)
    assert [c.id for c in result] == ["a", "b", "c"]
    for before, after in zip(CONVERSATIONS, result, strict=True):
        assert [t.role for t in after.turns] == [t.role for t in before.turns]
        for old, new in zip(before.turns, after.turns, strict=True):
            if old.role != "assistant" or old.content == "orphan":
                assert new == old  # questions, system prompts and orphan answers stay
    # The second answer of "a" is what the target says after its own first answer.
    first, second = result[0].turns[1].content, result[0].turns[3].content
    prompt = tiny_target.tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "w1 w2"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "w4"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        second
        == regenerate_module._generate(tiny_target, [prompt], max_new_tokens=3, temperature=0.0, batch_size=1)[
            0
        ].strip()
    )


def test_a_killed_run_resumes_from_its_chunks_and_sampling_repeats(
    tiny_target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = _regenerate(tiny_target, tmp_path / "whole", temperature=1.0)
    _regenerate(tiny_target, tmp_path / "resumed", temperature=1.0)
    (tmp_path / "resumed" / "chunk-00001.jsonl").unlink()  # as if killed while writing chunk 1
    assert _regenerate(tiny_target, tmp_path / "resumed", temperature=1.0) == whole

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished run must not generate again")

    monkeypatch.setattr(regenerate_module, "_generate", no_generation)
    assert _regenerate(tiny_target, tmp_path / "resumed", temperature=1.0) == whole


def test_prep_caches_the_regenerated_answers_and_reuses_them_for_other_layers(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from specdec.data_prep import CacheConfig, DataConfig, HiddenStateCache, prepare_cache

    source = tmp_path / "chats.jsonl"
    rows = [{"id": c.id, "messages": [{"role": t.role, "content": t.content} for t in c.turns]} for c in CONVERSATIONS]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    target_cfg = TargetConfig(path=str(tiny_llama_dir))
    target = load_target(target_cfg)

    def prep(layers: list[int], overwrite: bool = False):
        data = DataConfig(path=str(source), regenerate=True, regenerate_max_new_tokens=3, max_length=64)
        cache = CacheConfig(dir=str(tmp_path / "cache"), overwrite=overwrite)
        return prepare_cache(
            target, target_cfg=target_cfg, data_cfg=data, cache_cfg=cache, layers=layers, progress=False
        )

    prep(layers=[2])
    first = HiddenStateCache(tmp_path / "cache")[0]["input_ids"].tolist()
    (answers_dir,) = (tmp_path / "cache").glob("regenerated-*")
    monkeypatch.setattr(regenerate_module, "_generate", lambda *a, **k: pytest.fail("answers must be reused"))
    prep(layers=[1], overwrite=True)
    rebuilt = HiddenStateCache(tmp_path / "cache")
    assert rebuilt.layers == [1] and rebuilt[0]["input_ids"].tolist() == first
    assert list((tmp_path / "cache").glob("regenerated-*")) == [answers_dir]


def test_answers_after_a_prompt_of_max_length_tokens_are_left_as_they_are(tiny_llama_dir: Path) -> None:
    target = load_target(TargetConfig(path=str(tiny_llama_dir)))
    long_question = Conversation("long", (Turn("user", " ".join(["w1"] * 40)), Turn("assistant", "w2 w3")))

    def rewrite(chunk: list[Conversation]) -> list[Conversation]:
        return regenerate_module._regenerate_chunk(
            target,
            chunk,
            chat_template=None,
            max_prompt_tokens=16,
            progress_bar=type("Bar", (), {"update": lambda self, n: None})(),
            max_new_tokens=3,
            temperature=0.0,
            batch_size=8,
        )

    rewritten = rewrite([CONVERSATIONS[0], long_question])
    assert rewritten[1] == long_question  # it would be cut from the sample anyway
    assert rewritten[0] == rewrite([CONVERSATIONS[0]])[0]  # the other conversation is rewritten as if alone
    prompt = target.tokenizer.apply_chat_template(
        [{"role": "user", "content": "w1 w2"}], tokenize=False, add_generation_prompt=True
    )
    first_answer = regenerate_module._generate(target, [prompt], max_new_tokens=3, temperature=0.0, batch_size=1)
    assert rewritten[0].turns[1] == Turn("assistant", first_answer[0].strip())


def test_regeneration_leaves_the_callers_tokenizer_as_it_was(tiny_target, tmp_path: Path) -> None:
    tokenizer = tiny_target.tokenizer
    before = (tokenizer.padding_side, tokenizer.pad_token, tokenizer.truncation_side)
    assert before[0] == "right"  # as the training stages pad
    _regenerate(tiny_target, tmp_path)
    assert (tokenizer.padding_side, tokenizer.pad_token, tokenizer.truncation_side) == before


def test_a_batch_of_prompts_of_different_lengths_is_answered_as_each_prompt_alone(tiny_target) -> None:
    # Left padding: every row is continued at its right edge, and its padding is masked out.
    prompts = [
        tiny_target.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        for text in ("w1", "w2 w3 w4 w5 w6 w7", "w8 w9 w10")
    ]
    generate = dict(max_new_tokens=4, temperature=0.0)
    batched = regenerate_module._generate(tiny_target, prompts, batch_size=3, **generate)
    alone = [regenerate_module._generate(tiny_target, [prompt], batch_size=1, **generate)[0] for prompt in prompts]
    assert batched == alone


def test_a_rank_whose_chunks_never_come_is_named_after_the_timeout(tiny_target, tmp_path: Path) -> None:
    # Rank 0 of 2 writes chunk 0 (conversations a, b); chunk 1 belongs to rank 1, which never writes it.
    with pytest.raises(CacheError) as error:
        regenerate_answers(
            tiny_target,
            CONVERSATIONS,
            out_dir=tmp_path,
            max_new_tokens=3,
            temperature=0.0,
            chunk_size=2,
            rank=0,
            world=2,
            progress=False,
            wait_timeout_s=0.2,
        )
    message = str(error.value)
    assert message.startswith(
        f"{tmp_path}: 1 of 2 chunks of regenerated answers (chunk-00001.jsonl), to be written by rank(s) 1, "
        "have not appeared for 0 s: that rank has probably died."
    )
    assert "Rerun `specdec-prep` with the same recipe on all ranks" in message
    assert (tmp_path / "chunk-00000.jsonl").is_file()


def test_regeneration_removes_the_temporary_chunk_of_a_killed_run(tiny_target, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".chunk-00001.jsonl.tmp-{socket.gethostname()}-{dead.pid}"
    stale.write_text('{"id": "c", "tur')
    assert [c.id for c in _regenerate(tiny_target, tmp_path)] == ["a", "b", "c"]
    assert not stale.exists()
