import pytest
import torch

from specdec.trainer.drafters.draft_vocab import count_loss_tokens, draft_vocab


def test_only_loss_bearing_tokens_are_counted() -> None:
    samples = [
        {"input_ids": torch.tensor([5, 5, 7, 1]), "loss_mask": torch.tensor([False, True, True, True])},
        {"input_ids": torch.tensor([7, 9]), "loss_mask": torch.tensor([True, False])},
    ]
    assert count_loss_tokens(samples, 10).tolist() == [0, 1, 0, 0, 0, 1, 0, 2, 0, 0]


def test_the_most_frequent_tokens_in_the_eagle_convention() -> None:
    counts = torch.tensor([0, 5, 0, 9, 1, 0, 7, 0])
    d2t, t2d = draft_vocab(counts, 3)
    assert t2d.nonzero().flatten().tolist() == [1, 3, 6]  # the three most frequent, ascending
    assert (d2t + torch.arange(3)).tolist() == [1, 3, 6]  # target_id = draft_id + d2t[draft_id]
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool


def test_fewer_distinct_tokens_than_slots_are_topped_up_with_the_lowest_ids() -> None:
    _, t2d = draft_vocab(torch.tensor([0, 0, 4, 0, 0, 2]), 4)
    assert t2d.nonzero().flatten().tolist() == [0, 1, 2, 5]


def test_a_size_beyond_the_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match=r"draft.vocab_size=9: expected between 1 and the target's 8 tokens"):
        draft_vocab(torch.zeros(8, dtype=torch.long), 9)
