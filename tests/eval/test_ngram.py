"""The n-gram prompt lookup drafter (eval/drafters/ngram.py): the lookup rule on hand-made sequences
and against transformers' own PromptLookupCandidateGenerator on random ones, the prefix trees, the
session across commits and row selection, and lossless decoding through the engine (greedy and
sampled, chain and tree)."""

import random
from collections.abc import Iterable

import pytest
import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from specdec.data_prep.padding import pad
from specdec.eval import SpecConfig, generate
from specdec.eval.drafters.ngram import NgramDrafter
from specdec.eval.verify import Sampling, to_probs
from tests.eval.helpers import PlannedAcceptance, chi_square_p_value, first_pair_counts, hf_greedy, tiny_lm

VOCAB = 64


def _session(sequences: list[list[int]], *, max_ngram: int = 2, eos: Iterable[int] = ()) -> NgramDrafter:
    """A session begun on each sequence minus its last token (the pending one), left-padded as the
    engine does."""
    drafter = NgramDrafter(VOCAB, max_ngram=max_ngram, eos_token_ids=eos)
    ids, mask = pad([sequence[:-1] for sequence in sequences], side="left")
    drafter.begin(ids, mask, None)
    return drafter


def _chains(sequences: list[list[int]], k: int, *, max_ngram: int = 2, eos: Iterable[int] = ()) -> list[list[int]]:
    """Each sequence's chain of up to k drafts, the last token being the pending one."""
    proposal = _session(sequences, max_ngram=max_ngram, eos=eos).propose_chain(
        torch.tensor([sequence[-1] for sequence in sequences]), k, Sampling(), None
    )
    return [row[:length] for row, length in zip(proposal.tokens.tolist(), proposal.lengths.tolist(), strict=True)]


def _transformers_chain(sequence: list[int], k: int, *, max_ngram: int = 2, eos: Iterable[int] = ()) -> list[int]:
    eos_ids = sorted(eos)
    lookup = PromptLookupCandidateGenerator(
        eos_token_id=torch.tensor(eos_ids) if eos_ids else None,
        num_output_tokens=k,
        max_matching_ngram_size=max_ngram,
        max_length=10**6,  # no cap: the engine stops at max_new_tokens
    )
    candidates, _ = lookup.get_candidates(torch.tensor([sequence]))
    return candidates[0, len(sequence) :].tolist()


# ---- the lookup rule ----

# (sequence, k, options, expected draft): the last token is the pending one
LOOKUP_CASES = {
    # the 2-gram (1, 2) first occurs at 2; the 1-gram (2) would give 5 1 from position 0
    "longest_ngram_first": ([2, 5, 1, 2, 9, 1, 2], 2, {}, [9, 1]),
    "one_gram_when_asked": ([2, 5, 1, 2, 9, 1, 2], 2, {"max_ngram": 1}, [5, 1]),
    "earliest_match": ([1, 2, 3, 1, 2, 4, 1, 2], 2, {}, [3, 1]),
    "cut_at_k": ([1, 2, 3, 1, 2, 4, 1, 2], 1, {}, [3]),
    # the continuation runs into the pending token and stops there: 3 tokens for k = 4
    "cut_at_the_end": ([1, 2, 5, 1, 2], 4, {}, [5, 1, 2]),
    "cut_before_eos": ([1, 2, 3, 1, 2, 4, 1, 2], 4, {"eos": {4}}, [3, 1, 2]),
    # the first match's draft is empty once cut at EOS: final, the match at 3 (4 1 2) is not tried
    "eos_first_gives_nothing": ([1, 2, 3, 1, 2, 4, 1, 2], 4, {"eos": {3}}, []),
    "no_match": ([1, 2, 3, 4], 3, {}, []),
    # (1, 2) only matches itself at the very end: the 1-gram (2) at 0 gives the draft
    "end_match_ignored": ([2, 9, 1, 2], 3, {}, [9, 1, 2]),
    "only_the_end_matches": ([1, 2, 3], 3, {}, []),
    "overlapping_windows": ([3, 3, 3], 3, {}, [3]),
    "one_token": ([4], 3, {}, []),
}


@pytest.mark.parametrize("case", LOOKUP_CASES)
def test_the_lookup_drafts_what_the_rule_says_and_what_transformers_proposes(case: str) -> None:
    sequence, k, options, expected = LOOKUP_CASES[case]
    assert _chains([sequence], k, **options) == [expected]
    assert _transformers_chain(sequence, k, **options) == expected


def test_batched_lookups_equal_transformers_prompt_lookup_on_random_sequences() -> None:
    """600 random sequences over 5 tokens (lengths 1..40, so matches of every size and none),
    k = 1..5, n-grams up to 1..3, with and without EOS ids, in left-padded batches of 6."""
    rng = random.Random(0)
    checked = nonempty = 0
    for _ in range(100):
        k, max_ngram = rng.randint(1, 5), rng.randint(1, 3)
        eos = rng.choice([set(), {0}, {1, 4}])
        sequences = [[rng.randrange(5) for _ in range(rng.randint(1, 40))] for _ in range(6)]
        drafts = _chains(sequences, k, max_ngram=max_ngram, eos=eos)
        for sequence, draft in zip(sequences, drafts, strict=True):
            assert draft == _transformers_chain(sequence, k, max_ngram=max_ngram, eos=eos), (sequence, k, max_ngram)
            checked, nonempty = checked + 1, nonempty + bool(draft)
    assert checked == 600 and 100 < nonempty < 600  # both outcomes were compared


def test_padding_past_a_rows_length_is_a_valid_id_and_sampled_drafts_are_one_hot() -> None:
    sequences = [[1, 2, 3, 1, 2], [1, 2, 3, 4], [7, 8, 7]]
    pending = torch.tensor([2, 4, 7])
    greedy = _session(sequences).propose_chain(pending, 3, Sampling(), None)
    sampled = _session(sequences).propose_chain(pending, 3, Sampling(temperature=0.7), None)
    assert greedy.probs is None
    assert greedy.lengths.tolist() == [3, 0, 2]
    assert greedy.tokens.tolist() == [[3, 1, 2], [4, 4, 4], [8, 7, 7]]  # padded with the pending token
    assert torch.equal(sampled.tokens, greedy.tokens) and torch.equal(sampled.lengths, greedy.lengths)
    assert sampled.probs.shape == (3, 3, VOCAB)
    assert torch.equal(sampled.probs.argmax(-1), sampled.tokens) and bool((sampled.probs.sum(-1) == 1).all())


def test_a_row_that_matches_nothing_anywhere_drafts_a_chain_of_no_tokens() -> None:
    proposal = _session([[1, 2, 3, 4], [5]]).propose_chain(torch.tensor([4, 5]), 4, Sampling(), None)
    assert proposal.lengths.tolist() == [0, 0]
    assert proposal.tokens.shape == (2, 1)  # one padding column, never accepted


def test_max_ngram_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"max_ngram=0.*at least 1"):
        NgramDrafter(VOCAB, max_ngram=0)


# ---- trees ----


def test_a_tree_merges_the_first_distinct_continuations_largest_ngram_first() -> None:
    """Row 0: (1, 2) at 2 and 6 give 3 5 and 4 1, then the 1-gram (2) at 0 gives 7 1 (at 3 and 7 it
    repeats them). Row 1: 3 5 and 3 6 share their first token. Row 2: the first continuation is
    empty once cut at EOS 9 and is skipped. Row 3 matches nothing and guesses its pending token."""
    sequences = [[2, 7, 1, 2, 3, 5, 1, 2, 4, 1, 2], [1, 2, 3, 5, 1, 2, 3, 6, 1, 2], [1, 2, 9, 1, 2, 8, 1, 2], [6]]
    pending = torch.tensor([sequence[-1] for sequence in sequences])
    tree = _session(sequences, eos={9}).propose_tree(pending, 2, 3)
    sizes = tree.sizes.tolist()
    assert sizes == [6, 3, 2, 1]
    tokens = [row[:size] for row, size in zip(tree.tokens.tolist(), sizes, strict=True)]
    parents = [row[:size] for row, size in zip(tree.parents.tolist(), sizes, strict=True)]
    assert tokens == [[3, 5, 4, 1, 7, 1], [3, 5, 6], [8, 1], [6]]
    assert parents == [[-1, 0, -1, 2, -1, 4], [-1, 0, 0], [-1, 0], [-1]]
    narrow = _session(sequences[:1]).propose_tree(pending[:1], 2, 1)
    assert narrow.tokens.tolist() == [[3, 5]] and narrow.parents.tolist() == [[-1, 0]]  # the chain's draft


# ---- the session across commits ----

TARGET = tiny_lm(vocab_size=VOCAB, seed=0)
# different lengths, a one-token prompt, and a repetitive one; the target's greedy decodes fall into
# cycles, so lookups are often right
PROMPTS = [[1, 5, 7, 9, 11], [1, 3], [1, 20, 21, 22, 23, 24, 25, 30], [4], [7, 8, 9, 10] * 4 + [7, 8]]
NEW_TOKENS = 40
REFERENCE = [hf_greedy(TARGET, prompt, NEW_TOKENS) for prompt in PROMPTS]


def test_after_commits_the_session_holds_the_accepted_text_and_drafts_its_lookup() -> None:
    """A planned number of accepted drafts that differs per row and step, rows finishing at different
    steps: at every step, each row's tokens are its prompt and generated tokens but the pending one,
    and its chain is the lookup on that text."""
    prompts, k = PROMPTS, 3
    session, checked = NgramDrafter(VOCAB), []

    def record(rows, done, proposal) -> None:
        for row, index in enumerate(rows):
            text = prompts[index] + REFERENCE[index][: done[index]]  # the pending token last
            assert session.rows[row].tokens == text[:-1], (index, done[index])
            drafted = proposal.tokens[row, : int(proposal.lengths[row])].tolist()
            assert drafted == _transformers_chain(text, k), (index, done[index])
            checked.append(bool(drafted))

    drafter = PlannedAcceptance(session, REFERENCE, record, vocab_size=VOCAB)
    result = generate(TARGET, prompts, drafter=drafter, cfg=SpecConfig(k=k, max_new_tokens=16), eos_token_ids=set())
    assert result.new_tokens == [reference[:16] for reference in REFERENCE]
    assert len({len(row) for row in result.accepted}) > 1  # rows left the batch at different steps
    assert len(checked) > 5 * 5 and any(checked) and not all(checked)


# ---- lossless decoding ----


@pytest.mark.parametrize("tree_width", [1, 3], ids=["chain", "tree"])
def test_greedy_output_with_an_ngram_drafter_is_the_targets_own(tree_width: int) -> None:
    """Single prompts and the batch; drafts are often accepted, and (chains) some steps draft nothing."""
    cfg = SpecConfig(k=4, tree_width=tree_width, max_new_tokens=NEW_TOKENS)
    single = [generate(TARGET, [p], drafter=NgramDrafter(VOCAB), cfg=cfg, eos_token_ids=set()) for p in PROMPTS]
    batched = generate(TARGET, PROMPTS, drafter=NgramDrafter(VOCAB), cfg=cfg, eos_token_ids=set())
    assert [r.new_tokens[0] for r in single] == REFERENCE
    assert batched.new_tokens == REFERENCE
    accepted = [n for row in batched.accepted for n in row]
    assert sum(accepted) / len(accepted) > 1.0
    assert 0 in accepted  # and some drafts were rejected or missing
    if tree_width == 1:
        assert 0 in {n for row in batched.drafted for n in row}


def test_greedy_output_stops_at_eos_like_the_target_with_eos_cut_drafts() -> None:
    """46 is EOS for the engine and the drafter: rows stop at their first 46 (some never emit it)."""
    eos = 46
    expected = [hf_greedy(TARGET, prompt, NEW_TOKENS, eos=eos) for prompt in PROMPTS]
    assert len({len(tokens) for tokens in expected}) > 1
    result = generate(
        TARGET,
        PROMPTS,
        drafter=NgramDrafter(VOCAB, eos_token_ids={eos}),
        cfg=SpecConfig(k=4, max_new_tokens=NEW_TOKENS),
        eos_token_ids={eos},
    )
    assert result.new_tokens == expected


# Sampling losslessness on test_engine's 6-token target, from a prompt whose 2-gram (1, 2) repeats,
# so the first step already drafts 3 1: the law of the first two new tokens, exactly.
from tests.eval.test_engine import ALPHA, SMALL_TARGET  # noqa: E402

REPEATING_PROMPT = [1, 2, 3, 1, 2]


def _exact_law(sampling: Sampling, length: int = 2) -> torch.Tensor:
    """P(the first `length` new tokens after REPEATING_PROMPT) [6**length]; cell = the tokens in base 6."""
    law = torch.ones(1, dtype=torch.float64)
    for step in range(length):
        tails = [[(cell // 6**power) % 6 for power in reversed(range(step))] for cell in range(6**step)]
        with torch.no_grad():
            logits = SMALL_TARGET(torch.tensor([REPEATING_PROMPT + tail for tail in tails])).logits[:, -1]
        law = (law[:, None] * to_probs(logits, sampling).double()).flatten()
    return law


@pytest.mark.parametrize("tree_width", [1, 3], ids=["chain", "tree"])
def test_sampled_output_with_an_ngram_drafter_follows_the_target_distribution(tree_width: int) -> None:
    """8000 draws of the first two tokens, chi-square at ALPHA; drafts are accepted, not all of them."""
    sampling = Sampling(temperature=1.0)
    cfg = SpecConfig(k=2, tree_width=tree_width, max_new_tokens=2, sampling=sampling)
    result = generate(
        SMALL_TARGET,
        [REPEATING_PROMPT] * 8000,
        drafter=NgramDrafter(6),
        cfg=cfg,
        eos_token_ids=set(),
        generator=torch.Generator().manual_seed(0),
    )
    counts = first_pair_counts(result.new_tokens)
    assert chi_square_p_value(counts, _exact_law(sampling)) > ALPHA
    accepted = [n for row in result.accepted for n in row]
    assert 0 < sum(accepted) < len(accepted)
