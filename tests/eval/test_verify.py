import pytest
import torch

from specdec.eval import verify
from specdec.eval.tree import DraftTree, ancestor_mask, verify_tree_greedy, verify_tree_sampled
from specdec.eval.verify import Sampling, to_probs, verify_chain_greedy, verify_chain_sampled
from tests.eval.helpers import chi_square_p_value

# Three draft positions over a 4-token vocabulary; the target's argmax at each block entry:
TARGET_ARGMAX = torch.tensor([[2, 1, 3, 0], [2, 1, 3, 0], [2, 1, 3, 0]])
LOGITS = torch.nn.functional.one_hot(TARGET_ARGMAX, 4).float() * 5


@pytest.mark.parametrize(
    ("drafts", "accepted", "next_token"),
    [([2, 1, 3], 3, 0), ([2, 0, 3], 1, 1), ([0, 1, 3], 0, 2)],
    ids=["all accepted, bonus", "second rejected, correction", "first rejected"],
)
def test_greedy_chain_accepts_the_prefix_that_matches_the_argmax(drafts, accepted, next_token) -> None:
    verdict = verify_chain_greedy(draft_tokens=torch.tensor([drafts]), target_logits=LOGITS[:1])
    assert verdict.accepted.tolist() == [accepted] and verdict.next_tokens.tolist() == [next_token]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(to_probs(logits, Sampling(1.0, top_p=0.7)), torch.tensor([[0.625, 0.375, 0, 0]]))
    assert torch.allclose(to_probs(logits, Sampling(1.0, top_p=0.85)), torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)


P = torch.tensor([0.1, 0.5, 0.3, 0.1])
Q = torch.tensor([0.4, 0.1, 0.1, 0.4])


def _one_draft_chains(samples: int, seed: int = 0):
    """`samples` chains of one draft drawn from Q, verified against P: (drafts [N, 1], verdict)."""
    generator = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(Q.expand(samples, -1), 1, replacement=True, generator=generator)
    verdict = verify_chain_sampled(
        draft_tokens=drafts,
        draft_probs=Q.expand(samples, 1, -1),
        target_probs=P.expand(samples, 2, -1),
        generator=generator,
    )
    return drafts, verdict


def _first_tokens(samples: int) -> torch.Tensor:
    """The first emitted token of each chain: the accepted draft, or the correction."""
    drafts, verdict = _one_draft_chains(samples)
    return torch.where(verdict.accepted == 1, drafts[:, 0], verdict.next_tokens)


# Significance of the distribution tests: a correct verifier fails with this probability.
ALPHA = 1e-3


def test_rejection_sampling_emits_the_target_distribution() -> None:
    tokens = _first_tokens(40_000)
    assert chi_square_p_value(torch.bincount(tokens, minlength=4).double(), P.double()) > ALPHA


def test_resampling_from_p_instead_of_the_residual_fails_the_same_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "residual", lambda target_probs, draft_probs: target_probs)
    tokens = _first_tokens(40_000)
    assert chi_square_p_value(torch.bincount(tokens, minlength=4).double(), P.double()) < 1e-9


def test_the_acceptance_rate_is_the_sum_of_minima() -> None:
    samples = 40_000
    _, verdict = _one_draft_chains(samples, seed=1)
    alpha = torch.minimum(P, Q).sum()  # 0.1 + 0.1 + 0.1 + 0.1 = 0.4
    assert abs(verdict.accepted.float().mean() - alpha) < 4 * (alpha * (1 - alpha) / samples) ** 0.5


# A depth-2, width-2 tree: nodes 0, 1 under the root; nodes 2, 3 under node 0.
TREE = DraftTree(tokens=torch.tensor([[1, 2, 3, 0]]), parents=torch.tensor([[-1, -1, 0, 0]]), depth=2, width=2)


def test_ancestor_mask_lets_each_node_see_only_its_path() -> None:
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(ancestor_mask(TREE)[0], expected)


def test_greedy_tree_follows_the_argmax_as_deep_as_it_goes() -> None:
    # root prefers 1 (node 0); node 0 prefers 0 (node 3); node 3 prefers 2 (bonus)
    argmax = torch.tensor([[1, 0, 0, 0, 2]])
    verdict = verify_tree_greedy(TREE, target_logits=torch.nn.functional.one_hot(argmax, 4).float())
    assert verdict.paths == [[0, 3]] and verdict.next_tokens.tolist() == [2]
    argmax = torch.tensor([[3, 0, 0, 0, 0]])  # no child of the root is the argmax
    verdict = verify_tree_greedy(TREE, target_logits=torch.nn.functional.one_hot(argmax, 4).float())
    assert verdict.paths == [[]] and verdict.next_tokens.tolist() == [3]


def test_sampled_tree_emits_the_target_distribution_at_the_first_position() -> None:
    samples, generator = 20_000, torch.Generator().manual_seed(0)
    target_probs = P.expand(1, 5, -1)
    first = []
    for _ in range(samples):
        verdict = verify_tree_sampled(TREE, target_probs=target_probs, generator=generator)
        first.append(TREE.tokens[0, verdict.paths[0][0]] if verdict.paths[0] else verdict.next_tokens[0])
    counts = torch.bincount(torch.stack(first), minlength=4).double()
    assert chi_square_p_value(counts, P.double()) > ALPHA
