import pytest
import torch

from specdec.eval import verify
from specdec.eval.tree import (
    DraftTree,
    ancestor_mask,
    block_offsets,
    expand_tree,
    verify_tree_greedy,
    verify_tree_sampled,
)
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


def test_the_mean_accepted_length_of_a_chain_is_the_sum_of_products_of_minima() -> None:
    """K = 3 drafts, each d_i ~ q_i against p_i independent of the path, so E[accepted] =
    sum_k prod_{i<=k} alpha_i (Leviathan et al., arXiv 2211.17192, section 3.5): checks that a
    rejection stops the chain (the cumprod), through the real verifier."""
    samples, generator = 100_000, torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(4, 5, generator=generator), -1)  # [K+1, V]
    q = torch.softmax(torch.randn(3, 5, generator=generator), -1)  # [K, V]
    drafts = torch.stack([torch.multinomial(q[i], samples, replacement=True, generator=generator) for i in range(3)], 1)
    verdict = verify_chain_sampled(
        draft_tokens=drafts,
        draft_probs=q.expand(samples, -1, -1),
        target_probs=p.expand(samples, -1, -1),
        generator=generator,
    )
    alpha = torch.minimum(p[:3], q).sum(-1)
    expected = alpha.cumprod(0).sum()
    spread = verdict.accepted.float().std() / samples**0.5
    assert abs(verdict.accepted.float().mean() - expected) < 4 * spread


# A depth-2, width-2 tree: nodes 0, 1 under the root; nodes 2, 3 under node 0.
TREE = DraftTree(tokens=torch.tensor([[1, 2, 3, 0]]), parents=torch.tensor([[-1, -1, 0, 0]]))


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


def test_a_draft_the_target_never_emits_is_rejected_even_when_the_uniform_is_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """u is drawn from [0, 1): u = 0 happens. The test is u < p/q, so p(d) = 0 must reject at u = 0."""
    monkeypatch.setattr(torch, "rand", lambda *size, generator=None, device=None: torch.zeros(*size, device=device))
    target = torch.tensor([[[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]]])  # p(0) = 0 at the first draft
    verdict = verify_chain_sampled(
        draft_tokens=torch.tensor([[0]]),
        draft_probs=torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]),
        target_probs=target,
        generator=torch.Generator().manual_seed(0),
    )
    assert verdict.accepted.tolist() == [0]
    assert verdict.next_tokens.tolist()[0] in (1, 2)  # from the residual norm(max(0, p - q)) = p here


def test_greedy_chains_accept_no_further_than_each_rows_length() -> None:
    """Every draft is the argmax, padding included: only the lengths stop acceptance, and the next
    token is the argmax after the row's last drafted entry."""
    drafts = TARGET_ARGMAX[:, :3]  # [3, 3]: all equal to the target's choices
    verdict = verify_chain_greedy(draft_tokens=drafts, target_logits=LOGITS, lengths=torch.tensor([3, 1, 0]))
    assert verdict.accepted.tolist() == [3, 1, 0]
    assert verdict.next_tokens.tolist() == [0, 1, 2]


def test_sampled_chains_accept_no_further_than_each_rows_length() -> None:
    """Perfect drafts (q = p) are accepted with probability 1, padding too if it were read."""
    samples, k, generator = 2_000, 3, torch.Generator().manual_seed(3)
    target = torch.softmax(torch.randn(samples, k + 1, 5, generator=generator), -1)
    drafts = torch.multinomial(target[:, :k].flatten(0, 1), 1, generator=generator).view(samples, k)
    lengths = torch.randint(0, k + 1, (samples,), generator=generator)
    verdict = verify_chain_sampled(
        draft_tokens=drafts, draft_probs=target[:, :k], target_probs=target, lengths=lengths, generator=generator
    )
    assert torch.equal(verdict.accepted, lengths)


# An irregular tree: the root has 3 children (nodes 0, 1, 2); node 1 carries a chain of 2 (3, then 4).
FAN = DraftTree(tokens=torch.tensor([[0, 1, 2, 3, 0]]), parents=torch.tensor([[-1, -1, -1, 1, 3]]))


def test_offsets_and_mask_of_an_irregular_tree_follow_its_parents() -> None:
    assert block_offsets(FAN).tolist() == [[0, 1, 1, 1, 2, 3]]
    visible = ancestor_mask(FAN)[0].long().tolist()
    assert visible == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1, 1],
    ]


def test_greedy_verification_walks_an_irregular_tree() -> None:
    # root prefers 1 (node 1); node 1 prefers 3 (node 3); node 3 prefers 0 (node 4); node 4: bonus 2
    argmax = torch.tensor([[1, 0, 3, 0, 0, 2]])
    verdict = verify_tree_greedy(FAN, target_logits=torch.nn.functional.one_hot(argmax, 4).float())
    assert verdict.paths == [[1, 3, 4]] and verdict.next_tokens.tolist() == [2]
    argmax = torch.tensor([[2, 0, 0, 1, 0, 0]])  # node 2 is a leaf: its entry gives the bonus
    verdict = verify_tree_greedy(FAN, target_logits=torch.nn.functional.one_hot(argmax, 4).float())
    assert verdict.paths == [[2]] and verdict.next_tokens.tolist() == [1]


def test_a_tree_whose_parent_comes_after_its_child_is_refused() -> None:
    with pytest.raises(ValueError, match="parents must come before their children"):
        DraftTree(tokens=torch.tensor([[1, 2]]), parents=torch.tensor([[1, -1]]))


def _beam_reference(logprobs_of, root: list[float], depth: int, width: int):
    """EAGLE-2's levels straight from the definition: level l keeps the `width` children, among all
    children of level l-1's nodes, of highest summed log q. Returns (tokens, parents) level by level."""
    level = sorted(((score, (token,), -1) for token, score in enumerate(root)), reverse=True)[:width]
    tokens, parents = [t[-1] for _, t, _ in level], [-1] * width
    for depth_index in range(1, depth):
        candidates = [
            (score + child_score, (*path, child), (depth_index - 1) * width + rank)
            for rank, (score, path, _) in enumerate(level)
            for child, child_score in enumerate(logprobs_of(path))
        ]
        level = sorted(candidates, key=lambda candidate: candidate[0], reverse=True)[:width]
        tokens += [path[-1] for _, path, _ in level]
        parents += [parent for _, _, parent in level]
    return tokens, parents


def test_expand_tree_keeps_the_best_paths_by_summed_log_probability() -> None:
    vocab, depth, width = 7, 4, 3
    generator = torch.Generator().manual_seed(5)
    by_token = torch.log_softmax(torch.randn(vocab, vocab, generator=generator), -1)  # log q(next | last token)
    by_depth = torch.randn(depth + 1, vocab, generator=generator)  # and a depth term: paths differ in length
    root = torch.log_softmax(torch.randn(2, vocab, generator=generator), -1)  # [B=2, V]

    def logprobs_of(path: tuple[int, ...]) -> list[float]:
        return torch.log_softmax(by_token[path[-1]] + by_depth[len(path)], -1).tolist()

    calls = []

    def child_logprobs(tree: DraftTree) -> torch.Tensor:
        calls.append(tree.tokens.shape[1])
        last, depths = tree.tokens[:, -width:], block_offsets(tree)[:, -width:]  # [B, W] each
        return torch.log_softmax(by_token[last] + by_depth[depths], -1)

    tree = expand_tree(root, child_logprobs, depth=depth, width=width)
    assert calls == [3, 6, 9]  # once per level but the deepest, with the tree so far
    for row in range(2):
        tokens, parents = _beam_reference(logprobs_of, root[row].tolist(), depth, width)
        assert tree.tokens[row].tolist() == tokens and tree.parents[row].tolist() == parents
