"""KV caches of a batch whose rows advance by different amounts each verify step.

Rows are kept right-aligned: every row's entries end at the last slot, left padding is masked out
by a 2-D attention mask, and each row's positions count its own valid entries. A verify step
appends a block of A entries to every row ([pending, drafts...]); `keep_accepted` then keeps,
per row, only the entries of the accepted path and right-aligns the rows again, so the cache is
exactly what a fresh prefill of the accepted tokens would hold (rolled back, never re-prefilled).
"""

import torch
from transformers import DynamicCache, PreTrainedModel


def prefill_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] of a left-padded prompt: each row counts from its first real token."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def unless_all_visible(mask: torch.Tensor) -> torch.Tensor | None:
    """The mask, or None when it hides nothing: the model then takes its faster unmasked causal path."""
    return None if bool(mask.all()) else mask


def positions(attention_mask: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Position ids [B, A] of a block appended after the valid entries: valid count + block offset."""
    return attention_mask.sum(dim=1, keepdim=True) + block


def append(
    model: PreTrainedModel,
    cache: DynamicCache,
    attention_mask: torch.Tensor,
    tokens: torch.Tensor,
    offsets: torch.Tensor,
    block_mask: torch.Tensor | None,
    *,
    logits_to_keep: int = 0,
    output_hidden_states: bool = False,
):
    """Run `tokens` [B, n] through `model`, appending them to `cache` at positions valid + offsets.
    attention_mask [B, S] marks the valid cache entries; block_mask covers cache + tokens (2-D, or a
    4-D tree mask), None when nothing is masked. logits_to_keep=n runs the LM head on the last n only."""
    if logits_to_keep:
        # As indices, not HF's int: its slice is a view that torch's matmul cannot fold into one mm
        # when tokens come before it, and with frozen weights it then copies the whole LM head per
        # call (66 ms of a 49152-token head in bf16 on CPU, against 2 ms for the product itself).
        logits_to_keep = torch.arange(tokens.shape[1] - logits_to_keep, tokens.shape[1], device=tokens.device)
    return model(
        input_ids=tokens,
        attention_mask=block_mask,
        position_ids=positions(attention_mask, offsets),
        cache=cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        output_hidden_states=output_hidden_states,
    )


def prefill(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DynamicCache:
    """A fresh cache of `model` over a left-padded context [B, T] (attention_mask marks its valid
    entries); the LM head runs on the last position only, whose logits nobody reads."""
    cache = DynamicCache(config=model.config)
    if input_ids.shape[1]:
        with torch.inference_mode():
            append(
                model,
                cache,
                attention_mask[:, :0],
                input_ids,
                prefill_positions(attention_mask),
                unless_all_visible(attention_mask),
                logits_to_keep=1,
            )
    return cache


def _gather_layers(cache: DynamicCache, index: torch.Tensor) -> None:
    for layer in cache.layers:
        idx = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        layer.keys = layer.keys.gather(2, idx)
        layer.values = layer.values.gather(2, idx)


def keep_accepted(
    cache: DynamicCache, attention_mask: torch.Tensor, kept: list[list[int]], block_size: int
) -> torch.Tensor:
    """Keep, for row b, the block entries at offsets kept[b] (0 = pending) and drop the rest.

    attention_mask: [B, S] for the entries before the block; the cache holds S + block_size.
    Returns the new attention mask [B, S'] of the realigned cache.
    """
    batch, past = attention_mask.shape
    device = attention_mask.device
    longest = max(len(offsets) for offsets in kept)
    if all(offsets == list(range(longest)) for offsets in kept):  # same prefix everywhere: crop, no copy
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, : past + longest], layer.values[:, :, : past + longest]
        return torch.cat([attention_mask, attention_mask.new_ones(batch, longest)], dim=1)
    index = torch.zeros(batch, past + longest, dtype=torch.long, device=device)
    mask = torch.zeros(batch, past + longest, dtype=attention_mask.dtype, device=device)
    for row, offsets in enumerate(kept):
        shift = longest - len(offsets)  # left padding that keeps this row right-aligned
        index[row, shift : shift + past] = torch.arange(past, device=device)
        mask[row, shift : shift + past] = attention_mask[row]
        index[row, shift + past :] = past + torch.as_tensor(offsets, dtype=torch.long, device=device)
        mask[row, shift + past :] = 1
    first_used = int((mask.sum(dim=0) > 0).nonzero()[0]) if mask.any() else 0  # drop all-padding columns
    index, mask = index[:, first_used:], mask[:, first_used:]
    assert cache.get_seq_length() == past + block_size, "the block was not appended to this cache"
    _gather_layers(cache, index)
    return mask


def select_rows(cache: DynamicCache, attention_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keep only `rows` of the batch (finished sequences leave); returns their attention mask."""
    cache.batch_select_indices(rows)
    mask = attention_mask[rows]
    first_used = int((mask.sum(dim=0) > 0).nonzero()[0]) if mask.any() else mask.shape[1]
    if first_used:
        _gather_layers(cache, torch.arange(first_used, mask.shape[1], device=mask.device).expand(len(rows), -1))
    return mask[:, first_used:]


def block_mask(attention_mask: torch.Tensor, block_size: int) -> torch.Tensor | None:
    """The 2-D mask of a causal block appended to the cache; None when nothing is padded."""
    return unless_all_visible(
        torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], block_size)], dim=1)
    )


def tree_attention_mask(attention_mask: torch.Tensor, ancestors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask [B, 1, A, S + A] for a block whose entry i may see block entry j iff
    ancestors[b, i, j] (True on the diagonal), and every valid entry before the block."""
    visible = torch.cat([attention_mask.bool()[:, None, :].expand(-1, ancestors.shape[1], -1), ancestors], dim=2)
    return additive_mask(visible, dtype)[:, None]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "query may see key" mask as the additive one a model takes: 0 where visible, the
    dtype's lowest value elsewhere."""
    additive = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return additive.masked_fill_(~visible, torch.finfo(dtype).min)
