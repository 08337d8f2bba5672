"""The PARD drafter: one forward drafts K tokens (K past the trained 8 included), the output is the
target's own (greedy) or follows its law (sampled), and the cache stays a prefill of the accepted
tokens while the accepted drafts wait to be fed."""

import functools

import pytest
import torch
from transformers import DynamicCache

from specdec.data_prep.padding import pad
from specdec.eval import PardDrafter, Sampling, SpecConfig, generate
from specdec.eval.drafters import DrafterLoadError
from specdec.eval.verify import to_probs
from tests.eval.helpers import chi_square_p_value, perturbed, tiny_lm
from tests.eval.test_engine import (
    ALPHA,
    NEW_TOKENS,
    NUCLEUS,
    NUCLEUS_SAMPLES,
    PEAKED_DRAFT,
    PEAKED_TARGET,
    PROMPTS,
    REFERENCE,
    SMALL_DRAFT,
    TARGET,
    _exact_law,
    _sampled_counts,
    reference_accepted,
)

MASK = 63  # the reserved mask token of the 64-token tiny models
SMALL_MASK = 5  # and of the 6-token ones
DRAFT_MODELS = {"the target": tiny_lm(seed=0), "perturbed": perturbed(TARGET, 0.5)}
SHAPES = {"chain K=3": (3, 1), "chain K=12": (12, 1), "tree D=3 W=2": (3, 2)}  # (k, tree width); PARD trains K=8


def _reference_paths(model, context: list[int], depth: int, width: int) -> set[tuple[int, ...]]:
    """Every root-to-node path of PARD's draft, straight from its definition: one full forward (no
    cache) of the context and depth-1 masks gives q_l at the l-th of the last `depth` positions;
    level l keeps the `width` paths of highest summed log q among the level-(l-1) paths extended by
    every token (width 1: the argmax chain)."""
    with torch.no_grad():
        logits = model(torch.tensor([context + [MASK] * (depth - 1)])).logits[0, -depth:]
    level = [(0.0, ())]
    paths: set[tuple[int, ...]] = set()
    for logprobs in torch.log_softmax(logits.float(), dim=-1).tolist():
        candidates = [
            (score + logprob, (*path, token)) for score, path in level for token, logprob in enumerate(logprobs)
        ]
        level = sorted(candidates, key=lambda candidate: candidate[0], reverse=True)[:width]
        paths |= {path for _, path in level}
    return paths


@functools.cache
def _reference_accepted(drafter: str, k: int, width: int) -> list[list[int]]:
    """What the engine must record with DRAFT_MODELS[drafter] drafting PARD paths of depth k."""
    return reference_accepted(lambda context: _reference_paths(DRAFT_MODELS[drafter], context, k, width), k)


def _generate(drafter: str, shape: str, prompts: list[list[int]]):
    k, width = SHAPES[shape]
    cfg = SpecConfig(k=k, tree_width=width, max_new_tokens=NEW_TOKENS)
    return generate(TARGET, prompts, drafter=PardDrafter(DRAFT_MODELS[drafter], MASK), cfg=cfg, eos_token_ids=set())


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("drafter", list(DRAFT_MODELS))
@pytest.mark.parametrize("batched", [False, True], ids=["B=1", "B=4"])
def test_greedy_output_equals_the_target_decode(drafter: str, shape: str, batched: bool) -> None:
    """Batched, rows accept different counts, so the unfed drafts are ragged; the accepted counts
    are exactly the reference's, so the cached draft sees what a full forward sees."""
    results = [_generate(drafter, shape, group) for group in ([PROMPTS] if batched else [[p] for p in PROMPTS])]
    assert [tokens for result in results for tokens in result.new_tokens] == REFERENCE
    assert [steps for result in results for steps in result.accepted] == _reference_accepted(drafter, *SHAPES[shape])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_draft_equal_to_the_target_has_its_first_token_accepted_at_every_step(shape: str) -> None:
    """d_1 comes from the pending token's logits over the whole accepted prefix: with the target as
    draft it is the target's argmax, unless the cache is wrong (mask entries kept, accepted drafts
    fed at the wrong positions). The perturbed draft shows the bound is not automatic."""
    accepted = [n for row in _generate("the target", shape, PROMPTS).accepted for n in row]
    assert min(accepted) >= 1 and max(accepted) >= 2
    assert min(n for row in _generate("perturbed", shape, PROMPTS).accepted for n in row) == 0


def test_after_commit_the_cache_equals_a_fresh_prefill_of_the_fed_tokens() -> None:
    """Three steps on a left-padded batch whose rows accept (2, 0), (0, 3), (4, 1) drafts: the
    cache holds every accepted token but the last step's accepted drafts (fed next step), at the
    positions a prefill gives, with the padding slots and mask entries gone."""
    prompts = [[1, 5, 7, 9, 11], [1, 3]]
    model = DRAFT_MODELS["perturbed"]
    ids, mask = pad(prompts, side="left")
    drafter = PardDrafter(model, MASK)
    drafter.begin(ids[:, :-1], mask[:, :-1], None)
    accepted_tokens, pending = [prompt[:-1] for prompt in prompts], ids[:, -1]
    for step, counts in enumerate([(2, 0), (0, 3), (4, 1)]):
        block = torch.cat([pending[:, None], drafter.propose_chain(pending, 4, Sampling(), None).tokens], dim=1)
        kept = [list(range(count + 1)) for count in counts]
        drafter.commit(block, kept, None)
        for row, offsets in enumerate(kept):
            accepted_tokens[row] += block[row, offsets].tolist()
            unfed = block[row, offsets[1:]].tolist()
            assert drafter.unfed[row][drafter.unfed_mask[row].bool()].tolist() == unfed
            fresh = DynamicCache(config=model.config)
            with torch.no_grad():
                model(
                    input_ids=torch.tensor([accepted_tokens[row][: len(accepted_tokens[row]) - len(unfed)]]),
                    cache=fresh,
                )
            valid = drafter.mask[row].bool()
            for layer, fresh_layer in zip(drafter.cache.layers, fresh.layers, strict=True):
                torch.testing.assert_close(layer.keys[row][:, valid], fresh_layer.keys[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(layer.values[row][:, valid], fresh_layer.values[0], rtol=1e-5, atol=1e-5)
        pending = torch.tensor([40 + step, 50 + step])  # the verifier's next tokens: any will do


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0)], ids=["greedy", "sampled"])
def test_a_chain_past_the_trained_k_is_drafted_in_one_forward(sampling: Sampling) -> None:
    """K = 12 (PARD trains 8): the tokens (greedy) or their per-position distributions (sampled) are
    those of one full forward over the prompt, the pending token and 11 masks."""
    k, model = 12, DRAFT_MODELS["perturbed"]
    ids, mask = pad(PROMPTS, side="left")
    drafter = PardDrafter(model, MASK)
    drafter.begin(ids[:, :-1], mask[:, :-1], None)
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        proposal = drafter.propose_chain(ids[:, -1], k, sampling, torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(calls) == 1 and proposal.tokens.shape == (len(PROMPTS), k)
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + [MASK] * (k - 1)])).logits[0, -k:]
        if sampling.greedy:
            assert proposal.probs is None
            assert proposal.tokens[row].tolist() == logits.argmax(dim=-1).tolist()
        else:
            torch.testing.assert_close(proposal.probs[row], to_probs(logits, sampling), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("width", [1, 2], ids=["chain", "tree"])
def test_sampled_output_follows_the_target_distribution(width: int) -> None:
    counts = _sampled_counts(width, make_drafter=lambda: PardDrafter(SMALL_DRAFT, SMALL_MASK))
    assert chi_square_p_value(counts, _exact_law()) > ALPHA


def test_sampled_output_over_three_tokens_follows_the_target_at_temperature_and_top_p() -> None:
    """Three tokens from K=2 drafts: a step that rejects leaves accepted drafts to feed the next."""
    counts = _sampled_counts(
        1,
        make_drafter=lambda: PardDrafter(PEAKED_DRAFT, SMALL_MASK),
        target=PEAKED_TARGET,
        sampling=NUCLEUS,
        length=3,
        samples=NUCLEUS_SAMPLES,
    )
    law = _exact_law(NUCLEUS, length=3, target=PEAKED_TARGET)
    assert counts[law == 0].sum() == 0
    assert chi_square_p_value(counts, law) > ALPHA


def test_a_mask_id_outside_the_draft_vocabulary_is_refused_with_its_key() -> None:
    message = r"PARD's mask token 64 \(`pard_token` of a saved drafter's config\.json\) is not a token"
    with pytest.raises(DrafterLoadError, match=message):
        PardDrafter(TARGET, mask_token_id=64)
