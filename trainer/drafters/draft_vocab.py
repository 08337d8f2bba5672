"""A draft vocabulary: the `size` target tokens that most often carry the loss.

    used  = the `size` most frequent token ids where loss_mask is True (ties: lower id first),
            topped up with the lowest unused ids if fewer distinct tokens occur; sorted ascending
    d2t[i] = used[i] - i          offsets: target_id = draft_id + d2t[draft_id]
    t2d[v] = v in used            bool over the target vocabulary

The convention of SafeAILab/EAGLE eagle/traineagle3/cnets.py (cb7e084) and SpecForge
data/preprocessing.py::process_token_dict_to_mappings (a6b6b02), which SGLang and vLLM read
(shared/reference/ecosystem.md, section 1a).
"""

from collections.abc import Iterable

import torch

from specdec.eval.drafters import DrafterLoadError


def count_loss_tokens(samples: Iterable[dict[str, torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """Occurrences [V] of each token id where the loss mask is True; samples hold input_ids and loss_mask."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for sample in samples:
        counts += torch.bincount(sample["input_ids"][sample["loss_mask"].bool()], minlength=vocab_size)
    return counts


def draft_vocab(counts: torch.Tensor, size: int, reserved: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t [size] int64, t2d [V] bool) from per-token counts [V]; `reserved` (a CTC blank, which
    never occurs in the data) is always one of the `size` tokens."""
    vocab_size = len(counts)
    if not 0 < size <= vocab_size:
        raise ValueError(f"draft.vocab_size={size}: expected between 1 and the target's {vocab_size} tokens")
    if reserved is not None:
        counts = counts.clone()
        counts[reserved] = counts.max() + 1
    # stable sort by count, descending: equal counts keep ascending ids
    order = torch.sort(-counts, stable=True).indices
    used = torch.sort(order[:size]).values
    d2t = used - torch.arange(size)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[used] = True
    return d2t, t2d


def check_blank(counts: torch.Tensor, blank_id: int | None, key: str) -> None:
    """A CTC blank must be a token of the target that the training answers never contain."""
    if blank_id is None:
        return
    if not 0 <= blank_id < len(counts):
        raise DrafterLoadError(f"{key}={blank_id}: not a token of the target (ids 0..{len(counts) - 1}).")
    if counts[blank_id] > 0:
        raise DrafterLoadError(
            f"{key}={blank_id} occurs {int(counts[blank_id])} times among the answer tokens of the training data: "
            "CTC's blank must be a token the answers never contain (an unused special token, such as Llama's <unk> "
            "or SmolLM2's <|endoftext|>, id 0)."
        )
