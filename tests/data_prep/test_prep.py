import hashlib
import json
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

from specdec.data_prep import CacheConfig, DataConfig, TargetConfig, cache_key, load_target, read_conversations
from tests.conftest import make_tiny_llama, make_tiny_tokenizer

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
ROWS = [{"id": "m1", "messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}]


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache holding org/tiny at two commits, `main` at the first; the Hub is offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    for commit in (COMMIT_A, COMMIT_B):
        make_tiny_llama().save_pretrained(repo / "snapshots" / commit)
        make_tiny_tokenizer().save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo


def _key(target_cfg: TargetConfig, data_cfg: DataConfig) -> dict:
    target = load_target(target_cfg)
    return cache_key(target, target_cfg, data_cfg, CacheConfig(), layers=[1, 2], seed=0)


@pytest.fixture
def chats(tmp_path: Path) -> Path:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_a_hub_target_is_keyed_on_the_commit_its_revision_resolved_to(offline_hub: Path, chats: Path) -> None:
    target_cfg, data_cfg = TargetConfig(path="org/tiny"), DataConfig(path=str(chats))
    before = _key(target_cfg, data_cfg)
    assert before["target"] == f"org/tiny@{COMMIT_A}"
    (offline_hub / "refs" / "main").write_text(COMMIT_B)  # main moved on the Hub, and was downloaded again
    after = _key(target_cfg, data_cfg)
    assert after["target"] == f"org/tiny@{COMMIT_B}"
    assert {name for name in before if before[name] != after[name]} == {"target"}
    pinned = _key(TargetConfig(path="org/tiny", revision=COMMIT_A), data_cfg)
    assert pinned == before


def test_a_local_target_and_a_local_file_are_keyed_on_path_and_content(tiny_llama_dir: Path, chats: Path) -> None:
    key = _key(TargetConfig(path=str(tiny_llama_dir)), DataConfig(path=str(chats)))
    assert key["target"] == str(tiny_llama_dir)
    assert key["data"] == hashlib.sha256(chats.read_bytes()).hexdigest()


def test_a_datasets_source_is_keyed_on_its_fingerprint(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_rows = {"train": ROWS}
    loads = []

    def load_dataset(name: str, split: str) -> datasets.Dataset:
        loads.append((name, split))
        return datasets.Dataset.from_list(hub_rows[split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    target_cfg, data_cfg = TargetConfig(path=str(tiny_llama_dir)), DataConfig(path="someone/chats")
    before = _key(target_cfg, data_cfg)
    assert before["data"] == f"datasets:someone/chats:train@{datasets.Dataset.from_list(ROWS)._fingerprint}"
    assert [c.id for c in read_conversations(data_cfg).conversations] == ["m1"]
    assert loads == [("someone/chats", "train")] * 2

    hub_rows["train"] = [{**ROWS[0], "id": "m2"}]  # the dataset changed on the Hub
    after = _key(target_cfg, data_cfg)
    assert after["data"] != before["data"]
    assert {name for name in before if before[name] != after[name]} == {"data"}
