import json
import os
from pathlib import Path

import pytest
import torch

from specdec.trainer.specforge_anchor import read_specforge_samples, read_specforge_vocab, specforge_order

HIDDEN = 4  # H; the records are SmolLM2's layout at a readable size


def _write_features(features_dir: Path, lengths: list[int]) -> list[dict[str, torch.Tensor]]:
    """Records exactly as SpecForge's prepare_hidden_states.py writes them, plus the anchor's DONE.json."""
    generator = torch.Generator().manual_seed(0)
    records = []
    for index, length in enumerate(lengths):
        record = {
            "input_ids": torch.randint(0, 100, (length,), generator=generator),
            "loss_mask": torch.randint(0, 2, (length,), generator=generator),
            "aux_hidden_state": torch.randn(1, length, 3 * HIDDEN, generator=generator).bfloat16(),
            "hidden_state": torch.randn(1, length, HIDDEN, generator=generator).bfloat16(),
        }
        path = features_dir / "rows_0-2000" / f"data_{index}.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(record, path)
        records.append(record)
    (features_dir / "DONE.json").write_text(json.dumps({"samples": len(lengths), "lengths": lengths}))
    return records


def test_records_are_read_back_bit_for_bit_in_record_index_order(tmp_path: Path) -> None:
    records = _write_features(tmp_path, [5, 3, 7, 2, 4, 6, 3, 5, 2, 4, 3, 6])  # data_10, data_11 sort before data_2
    samples = read_specforge_samples(tmp_path)
    for sample, record in zip(samples, records, strict=True):
        assert torch.equal(sample["input_ids"], record["input_ids"])
        assert sample["loss_mask"].dtype == torch.bool
        assert torch.equal(sample["loss_mask"], record["loss_mask"] == 1)
        assert sample["hidden"].dtype == torch.bfloat16
        for layer in range(3):  # aux_hidden_state = cat(layer outputs, dim=-1), in capture order
            chunk = record["aux_hidden_state"][0, :, layer * HIDDEN : (layer + 1) * HIDDEN]
            assert torch.equal(sample["hidden"][:, layer], chunk)
        assert torch.equal(sample["hidden"][:, 3], record["hidden_state"][0])


def test_vocab_mapping_is_read_in_the_eagle3_convention(tmp_path: Path) -> None:
    kept = [0, 2, 3, 7, 11]  # SpecForge keeps the most frequent target ids, sorted
    d2t = torch.tensor([target - draft for draft, target in enumerate(kept)])
    t2d = torch.tensor([token in kept for token in range(13)])
    (tmp_path / "vocab_mapping").mkdir()
    torch.save({"d2t": d2t, "t2d": t2d}, tmp_path / "vocab_mapping" / "vocab_mapping.pt")
    read_d2t, read_t2d = read_specforge_vocab(tmp_path)
    assert torch.equal(read_d2t, d2t) and torch.equal(read_t2d, t2d)
    assert (torch.arange(5) + read_d2t).tolist() == kept  # target_id = draft_id + d2t[draft_id]


def test_a_mapping_whose_halves_disagree_is_refused(tmp_path: Path) -> None:
    (tmp_path / "vocab_mapping").mkdir()
    t2d = torch.tensor([True, False, True, True])
    torch.save({"d2t": torch.tensor([0, 0, 1]), "t2d": t2d}, tmp_path / "vocab_mapping" / "vocab_mapping.pt")
    with pytest.raises(ValueError, match=r"vocab_mapping.pt: d2t and t2d disagree"):
        read_specforge_vocab(tmp_path)


def test_order_is_randperm_over_the_path_sorted_files(tmp_path: Path) -> None:
    # The listing as SpecForge's list_feature_files does it (os.walk, sorted absolute paths).
    n, seed, epoch = 12, 3, 1
    _write_features(tmp_path, [2] * n)
    listed = sorted(
        os.path.join(root, name) for root, _, names in os.walk(tmp_path) for name in names if ".ckpt" in name
    )
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    expected = [int(Path(listed[position]).stem.removeprefix("data_")) for position in permutation]
    assert specforge_order(n, seed, epoch) == expected


def test_up_to_ten_records_the_order_is_randperm_itself() -> None:
    assert specforge_order(10, 0, 0) == torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()


def test_order_matches_the_anchor_run() -> None:
    # SmolLM2 anchor, 197 records, seed 0: steps.jsonl logged sample ids 115, 88, 55 (path-sorted positions) with
    # 512/294/512 tokens, which are records data_25, data_178, data_148.
    assert specforge_order(197, 0, 0)[:3] == [25, 178, 148]


def test_a_missing_features_dir_says_to_run_the_anchor(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*run\.sh --target smollm2"):
        read_specforge_samples(tmp_path / "features")


def test_a_missing_record_is_named(tmp_path: Path) -> None:
    _write_features(tmp_path, [2, 3, 4])
    (tmp_path / "rows_0-2000" / "data_1.ckpt").unlink()
    with pytest.raises(ValueError, match=r"records \[1\] are missing"):
        read_specforge_samples(tmp_path)
