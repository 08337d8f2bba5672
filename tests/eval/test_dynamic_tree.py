"""EAGLE-2's dynamic tree (`prune_tree`): the nodes kept on a hand-made tree, the output stays the
target's own (greedy, for every drafter that builds trees by expand_tree, batched rows of different
sizes) and follows its law (sampled), the drafter commits in its own tree's places, and a threshold
that keeps everything reproduces the whole tree step for step."""

import copy
import math

import pytest
import torch

from specdec.eval.drafters.causal_lm import CausalLMDrafter
from specdec.eval.drafters.eagle3 import Eagle3Drafter
from specdec.eval.drafters.pard import PardDrafter
from specdec.eval.engine import SpecConfig, generate
from specdec.eval.tree import DraftTree, expand_tree, prune_tree
from tests.eval.helpers import chi_square_p_value, perturbed, sharpened
from tests.eval.test_eagle3 import LAYERS, TARGET, _head

PROMPTS = [[1, 5, 7, 9, 11], [1, 3], [1, 20, 21, 22, 23, 24, 25, 30], [4, 6, 8]]
DRAFT = sharpened(perturbed(TARGET, 0.5), 25)  # peaked: path confidences from ~0 to ~1, so sizes vary


def _peaked_eagle3() -> Eagle3Drafter:
    head = _head()
    with torch.no_grad():
        head.lm_head.weight.mul_(6)
    return Eagle3Drafter(head, LAYERS)


SESSIONS = {
    "eagle3": _peaked_eagle3,
    "causal_lm": lambda: CausalLMDrafter(DRAFT),
    "pard": lambda: PardDrafter(DRAFT, 63),
}


def _tree() -> DraftTree:
    """Two rows of 2 levels x 2 nodes: node 2's parent is 0, node 3's is 1 (row 0) or 0 (row 1)."""
    log = math.log
    return DraftTree(
        tokens=torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]]),
        parents=torch.tensor([[-1, -1, 0, 1], [-1, -1, 0, 0]]),
        scores=torch.tensor([[log(0.7), log(0.2), log(0.5), log(0.1)], [log(0.4), log(0.35), log(0.3), log(0.05)]]),
    )


def test_pruning_keeps_the_confident_paths_per_row_with_parents_renumbered() -> None:
    pruned, nodes = prune_tree(_tree(), min_confidence=0.3)
    # row 0 keeps nodes 0 and 2 (0.7, 0.5); row 1 nodes 0, 1, 2 (0.4, 0.35, 0.3)
    assert pruned.sizes.tolist() == [2, 3]
    assert nodes.tolist() == [[0, 2, 2], [0, 1, 2]]  # row 0 padded with a copy of its last node
    assert pruned.tokens.tolist() == [[10, 12, 12], [20, 21, 22]]
    assert pruned.parents.tolist() == [[-1, 0, 0], [-1, -1, 0]]
    pruned, nodes = prune_tree(_tree(), min_confidence=0.9)  # nothing is that sure: the best node stays
    assert pruned.sizes.tolist() == [1, 1] and nodes.tolist() == [[0], [0]]


def test_a_node_whose_parent_is_dropped_goes_too() -> None:
    tree = _tree()
    scores = tree.scores.clone()
    scores[0, 3] = math.log(0.6)  # above the threshold, under a parent (node 1, 0.2) below it
    pruned, nodes = prune_tree(DraftTree(tree.tokens, tree.parents, scores=scores), min_confidence=0.3)
    assert nodes[0, : int(pruned.sizes[0])].tolist() == [0, 2]


def test_expand_tree_scores_are_the_summed_log_probabilities_of_each_path() -> None:
    torch.manual_seed(0)
    root = torch.log_softmax(torch.randn(2, 9), dim=-1)
    levels = torch.log_softmax(torch.randn(2, 3, 9), dim=-1)  # q of level l+1, the same under every node
    tree = expand_tree(
        root, lambda tree: levels[:, tree.tokens.shape[1] // 3 - 1, None].expand(-1, 3, -1), depth=3, width=3
    )
    for row in range(2):
        for node in range(9):
            path, current = [], node
            while current >= 0:
                path.append(current)
                current = int(tree.parents[row, current])
            depths = range(len(path))
            expected = sum(
                (root if depth == 0 else levels[:, depth - 1])[row, int(tree.tokens[row, index])]
                for depth, index in zip(depths, reversed(path), strict=True)
            )
            assert tree.scores[row, node].item() == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("kind", list(SESSIONS))
def test_greedy_output_with_dynamic_trees_is_the_targets_own(kind: str) -> None:
    from tests.eval.helpers import hf_greedy

    reference = [hf_greedy(TARGET, prompt, 32) for prompt in PROMPTS]
    cfg = SpecConfig(k=3, tree_width=3, max_new_tokens=32, tree_min_confidence=0.1)
    sizes = set()
    for prompts in ([PROMPTS], [[prompt] for prompt in PROMPTS]):
        for batch in prompts:
            result = generate(TARGET, batch, drafter=SESSIONS[kind](), cfg=cfg, eos_token_ids=set())
            assert result.new_tokens == [reference[PROMPTS.index(prompt)] for prompt in batch]
            sizes |= {n for row in result.drafted for n in row}
    assert len(sizes) >= 3 and max(sizes) < 9  # sized per row and step, never the whole tree here


@pytest.mark.parametrize("kind", list(SESSIONS))
def test_a_threshold_that_keeps_every_node_reproduces_the_whole_tree(kind: str) -> None:
    whole = SpecConfig(k=3, tree_width=2, max_new_tokens=24)
    everything = SpecConfig(k=3, tree_width=2, max_new_tokens=24, tree_min_confidence=1e-30)
    expected = generate(TARGET, PROMPTS, drafter=SESSIONS[kind](), cfg=whole, eos_token_ids=set())
    result = generate(TARGET, PROMPTS, drafter=SESSIONS[kind](), cfg=everything, eos_token_ids=set())
    assert result.new_tokens == expected.new_tokens and result.accepted == expected.accepted
    assert {n for row in result.drafted for n in row} == {6}


def test_sampled_output_with_dynamic_trees_follows_the_target_distribution() -> None:
    """Peaked 6-token models, so that rows of one batch keep trees of different sizes."""
    from specdec.eval.verify import Sampling
    from tests.eval.test_engine import ALPHA, PEAKED_DRAFT, PEAKED_TARGET, SMALL_PROMPT, _exact_law

    generator, counts, sizes = torch.Generator().manual_seed(0), torch.zeros(36, dtype=torch.float64), set()
    sampling = Sampling(temperature=1.0)
    cfg = SpecConfig(k=2, tree_width=3, max_new_tokens=2, sampling=sampling, tree_min_confidence=0.2)
    for _ in range(8):
        result = generate(
            PEAKED_TARGET,
            [SMALL_PROMPT] * 1000,
            drafter=CausalLMDrafter(PEAKED_DRAFT),
            cfg=cfg,
            eos_token_ids=set(),
            generator=generator,
        )
        sizes |= {n for row in result.drafted for n in row}
        for a, b in (tokens[:2] for tokens in result.new_tokens):
            counts[a * 6 + b] += 1
    assert sizes == {1, 2, 3}
    assert chi_square_p_value(counts, _exact_law(sampling, target=PEAKED_TARGET)) > ALPHA


def test_the_causal_lm_drafts_each_dynamic_tree_from_the_accepted_prefix() -> None:
    """The drafter's cache must follow the accepted path through its own (whole) tree: the accepted
    counts equal those of trees built from full forwards of the accepted prefix (no cache), pruned
    by path probability. The draft is the target with a sharpened head: it agrees with the target,
    so deep nodes get accepted after pruned siblings, where the two numberings differ; a drafter
    committed in the pruned tree's numbering keeps the wrong cache entries and drafts other trees."""
    from tests.eval.test_engine import NEW_TOKENS, reference_accepted
    from tests.eval.test_engine import PROMPTS as ENGINE_PROMPTS
    from tests.eval.test_engine import TARGET as ENGINE_TARGET

    depth, width, min_confidence = 3, 3, 0.1
    draft = sharpened(copy.deepcopy(ENGINE_TARGET), 25)

    def kept_paths(context: list[int]) -> set[tuple[int, ...]]:
        level, kept = [(0.0, ())], set()
        for step in range(depth):
            with torch.no_grad():
                logits = draft(torch.tensor([context + list(path) for _, path in level])).logits[:, -1]
            candidates = [
                (score + logprob, (*path, token))
                for (score, path), logprobs in zip(level, torch.log_softmax(logits.float(), -1).tolist(), strict=True)
                for token, logprob in enumerate(logprobs)
            ]
            level = sorted(candidates, key=lambda candidate: candidate[0], reverse=True)[:width]
            kept |= {path for score, path in level if score >= math.log(min_confidence)}
            if step == 0:
                kept.add(level[0][1])  # the best node always stays
        return kept

    cfg = SpecConfig(k=depth, tree_width=width, max_new_tokens=NEW_TOKENS, tree_min_confidence=min_confidence)
    result = generate(ENGINE_TARGET, ENGINE_PROMPTS, drafter=CausalLMDrafter(draft), cfg=cfg, eos_token_ids=set())
    assert result.accepted == reference_accepted(kept_paths, depth)
    assert len({n for row in result.drafted for n in row}) >= 3
