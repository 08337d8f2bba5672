"""The n-gram-first hybrid: an EAGLE-3 session that skips steps (another drafter drafted them) and
feeds their accepted tokens later drafts what a fresh session on the accepted prefix drafts, and
the hybrid's output is the target's own greedy decode with both of its drafters used."""

import torch

from specdec.eval.drafters.eagle3 import Eagle3Drafter
from specdec.eval.drafters.hybrid import HybridDrafter
from specdec.eval.drafters.ngram import NgramDrafter
from specdec.eval.engine import SpecConfig, generate
from specdec.eval.verify import Sampling
from specdec.eval.window import LearnedWindow
from tests.eval.helpers import PlannedAcceptance, hf_greedy
from tests.eval.test_eagle3 import LAYERS, TARGET, _head
from tests.eval.test_window import _window_head


class SkippingPlanned(PlannedAcceptance):
    """PlannedAcceptance whose session drafts only on some steps, as the hybrid's trained drafter does."""

    def propose_chain(self, pending, k, sampling, generator):
        if self.step % 3 == 1 or (self.step % 5 == 3):  # another drafter's steps: the session is not asked
            session, self.session = self.session, _Silent()
            try:
                return super().propose_chain(pending, k, sampling, generator)
            finally:
                self.session = session
        return super().propose_chain(pending, k, sampling, generator)


class _Silent:
    def propose_chain(self, pending, k, sampling, generator):
        return None


def test_a_session_that_skipped_steps_drafts_what_a_fresh_session_on_the_accepted_prefix_drafts() -> None:
    prompts = [[1, 5, 7, 9, 11], [1, 3, 8], [1, 20, 21, 22, 23, 24, 25, 30]]
    new_tokens, k = 18, 3
    references = [hf_greedy(TARGET, prompt, new_tokens) for prompt in prompts]
    head = _head(32)
    session, records = Eagle3Drafter(head, LAYERS), []

    def record(rows, done, proposal) -> None:
        if proposal is not None:
            records.extend((index, done[index], proposal.tokens[row]) for row, index in enumerate(rows))

    drafter = SkippingPlanned(session, references, record)
    result = generate(
        TARGET, prompts, drafter=drafter, cfg=SpecConfig(k=k, max_new_tokens=new_tokens), eos_token_ids=set()
    )
    assert result.new_tokens == references
    assert len(records) > 3 * 3
    for index, done, tokens in records:
        prefix = torch.tensor([prompts[index] + references[index][:done]])
        with torch.no_grad():
            hidden = TARGET(prefix[:, :-1], output_hidden_states=True).hidden_states
        fresh = Eagle3Drafter(head, LAYERS)
        fresh.begin(prefix[:, :-1], torch.ones_like(prefix[:, :-1]), torch.stack([hidden[i] for i in LAYERS], dim=2))
        expected = fresh.propose_chain(prefix[:, -1], k, Sampling(), None)
        assert tokens.tolist() == expected.tokens[0].tolist(), (index, done)


def test_the_hybrids_output_is_the_targets_own_and_both_drafters_draft() -> None:
    prompts = [[1, 5, 7, 9, 5, 7, 9, 5, 7], [1, 3, 8, 3, 8, 3], [1, 20, 21, 22, 23, 24, 25, 30]]
    references = [hf_greedy(TARGET, prompt, 40) for prompt in prompts]
    for window in (None, LearnedWindow(_window_head(threshold=0.5))):
        for prompt, reference in zip(prompts, references, strict=True):
            hybrid = HybridDrafter(NgramDrafter(64), Eagle3Drafter(_head(32), LAYERS, window=window))
            result = generate(
                TARGET, [prompt], drafter=hybrid, cfg=SpecConfig(k=4, max_new_tokens=40), eos_token_ids=set()
            )
            assert result.new_tokens == [reference]
            assert hybrid.lookup_steps > 0 and hybrid.trained_steps > 0
        batched = HybridDrafter(NgramDrafter(64), Eagle3Drafter(_head(32), LAYERS, window=window))
        result = generate(TARGET, prompts, drafter=batched, cfg=SpecConfig(k=4, max_new_tokens=40), eos_token_ids=set())
        assert result.new_tokens == references


def test_the_hybrids_drafter_drafts_up_to_its_own_k_and_lookup_up_to_the_engines() -> None:
    prompt = [1, 5, 7, 9, 5, 7, 9, 5, 7, 9, 5, 7]
    hybrid = HybridDrafter(NgramDrafter(64), Eagle3Drafter(_head(32), LAYERS), trained_k=2)
    result = generate(TARGET, [prompt], drafter=hybrid, cfg=SpecConfig(k=6, max_new_tokens=40), eos_token_ids=set())
    assert result.new_tokens == [hf_greedy(TARGET, prompt, 40)]
    drafted = {n for n in result.drafted[0]}
    assert 2 in drafted and drafted <= {1, 2, 3, 4, 5, 6} and max(drafted) > 2  # lookup's spans are longer
    assert hybrid.lookup_steps > 0 and hybrid.trained_steps > 0
