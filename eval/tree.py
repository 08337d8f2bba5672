"""Tree drafts verified in one target forward under a tree attention mask (SpecInfer, arXiv
2305.09781; Medusa, arXiv 2401.10774), and EAGLE-2's top-k expansion that builds them (Li et al.,
EAGLE-2, arXiv 2406.16858).

A tree is N nodes per row given by parent pointers: node i's parent is parents[b, i], -1 for a
child of the root, and parents come before their children. Any shape fits: EAGLE-2's levels of W
nodes, CTC candidate paths, a chain (N nodes, node i under node i-1). Block entry 0 is the pending
token (the root) and entry 1+i is node i, placed at the root's position + the node's depth; the
offsets and the attention mask both follow from the parents. Verification walks from the root:
- greedy: follow the child whose token is the target's argmax, as deep as it goes;
- sampling, with deterministic (top-k) children: at a node, with p = the target's distribution
  there, try the children in order; accept child c with probability p(c); on rejection set
  p(c) = 0 and renormalise; if every child is rejected, emit a token from what is left of p; at a
  leaf, emit a bonus token from p. Each step is a draw from p, so the output is lossless
  (objectives.md section 5.2, the EAGLE rule for top-k children).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    tokens: torch.Tensor  # [B, N] int64
    parents: torch.Tensor  # [B, N] int64: parent node of each node, -1 under the root; parents[b, i] < i
    # [B] int64: a row's real nodes, the first sizes[b] (the others pad it to N and are never accepted);
    # None = N for every row
    sizes: torch.Tensor | None = None
    # [B, N] float: EAGLE-2's score of each node, the summed log q of its path (`expand_tree`); None
    # when the drafter has no such score
    scores: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.shape != self.parents.shape:
            raise ValueError(
                f"a DraftTree needs tokens and parents of one shape [B, N]; got {tuple(self.tokens.shape)} "
                f"and {tuple(self.parents.shape)}"
            )
        nodes = torch.arange(self.tokens.shape[1], device=self.parents.device)
        if bool(((self.parents < -1) | (self.parents >= nodes)).any()):
            raise ValueError(
                "DraftTree parents must come before their children (-1 <= parents[b, i] < i); "
                f"got {self.parents.tolist()}"
            )


def ancestor_mask(tree: DraftTree) -> torch.Tensor:
    """[B, 1+N, 1+N] bool: block entry i may attend to entry j (itself, its ancestors, the root)."""
    batch, nodes = tree.tokens.shape
    mask = torch.zeros(batch, nodes + 1, nodes + 1, dtype=torch.bool, device=tree.tokens.device)
    mask[:, :, 0] = True
    rows = torch.arange(batch, device=mask.device)
    for node in range(nodes):  # parents come before their children, so their rows are complete
        mask[:, node + 1] = mask[rows, tree.parents[:, node] + 1]
        mask[:, node + 1, node + 1] = True
    return mask


def block_offsets(tree: DraftTree) -> torch.Tensor:
    """Position offset of each block entry [B, 1+N]: 0 for the root, the node's depth otherwise
    (an entry sees itself, its ancestors and the root: depth + 1 entries)."""
    return ancestor_mask(tree).sum(dim=-1) - 1


def expand_tree(
    root_logprobs: torch.Tensor,  # [B, V]: log q of the root's children
    child_logprobs: Callable[[DraftTree], torch.Tensor],  # tree so far -> [B, W, V], children of its last W nodes
    *,
    depth: int,
    width: int,
) -> DraftTree:
    """EAGLE-2's expansion (arXiv 2406.16858, section 4.1): with the score of a node

        score(node) = sum of log q(token | its path) over the path from the root to the node,

    level 1 is the W best children of the root; level l+1 takes the W best children of each of the
    W nodes of level l and keeps the W of highest score among those W*W. The result has depth*W
    nodes, level by level. `child_logprobs` is the drafter's forward: it is called once per level
    but the deepest, with the tree so far, whose last W nodes are the frontier. Tokens are ids of
    the drafter's own vocabulary, in the tree and in what the callback receives."""
    batch, device = root_logprobs.shape[0], root_logprobs.device
    scores, tokens = root_logprobs.topk(width, dim=-1)  # [B, W]
    all_tokens, all_parents, all_scores = [tokens], [torch.full((batch, width), -1, device=device)], [scores]
    for level in range(1, depth):
        tree = DraftTree(torch.cat(all_tokens, dim=1), torch.cat(all_parents, dim=1))
        child_scores, child_tokens = child_logprobs(tree).topk(width, dim=-1)  # [B, W, W]
        scores, best = (scores[:, :, None] + child_scores).flatten(1).topk(width, dim=-1)  # [B, W] of W*W
        all_tokens.append(child_tokens.flatten(1).gather(1, best))
        all_parents.append((level - 1) * width + best // width)  # frontier node index in the tree
        all_scores.append(scores)
    return DraftTree(
        torch.cat(all_tokens, dim=1), torch.cat(all_parents, dim=1), scores=torch.cat(all_scores, dim=1).float()
    )


def prune_tree(tree: DraftTree, min_confidence: float) -> tuple[DraftTree, torch.Tensor]:
    """EAGLE-2's dynamic tree, sized per row by the drafter's confidence: keep the nodes whose path
    confidence exp(score), the draft's probability of the whole path, is at least `min_confidence`
    (and always the best child of the root, so that a step drafts something). A confident row keeps
    a wide, deep tree, an unsure one a few nodes; the target verifies only what is kept. A node's
    score is at most its parent's, so the kept nodes are a tree. Returns the pruned tree (rows padded
    to its largest with copies of their last node, `sizes` their real counts) and, per kept node,
    its index in `tree` [B, N']."""
    if tree.scores is None:
        raise ValueError("prune_tree: the tree has no scores (trees from expand_tree have them)")
    keep = (
        tree.scores >= math.log(min_confidence)
        if min_confidence > 0
        else torch.ones_like(tree.scores, dtype=torch.bool)
    )
    keep[:, 0] = True
    rows = torch.arange(len(keep), device=keep.device)
    for node in range(keep.shape[1]):  # parents come first: a node whose parent was dropped goes too
        parent = tree.parents[:, node]
        keep[:, node] &= (parent < 0) | keep[rows, parent.clamp(min=0)]
    sizes = keep.sum(dim=1)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept nodes first, in tree order
    nodes = order[:, : int(sizes.max())]
    nodes = torch.where(
        torch.arange(nodes.shape[1], device=keep.device) < sizes[:, None], nodes, nodes.gather(1, sizes[:, None] - 1)
    )
    # where each kept node went (a row's last kept node, copied as padding, has no kept children)
    new_index = torch.full_like(tree.parents, -1).scatter(
        1, nodes, torch.arange(nodes.shape[1], device=keep.device).expand_as(nodes)
    )
    old_parents = tree.parents.gather(1, nodes)
    parents = torch.where(old_parents < 0, old_parents, new_index.gather(1, old_parents.clamp(min=0)))
    pruned = DraftTree(tree.tokens.gather(1, nodes), parents, sizes=sizes, scores=tree.scores.gather(1, nodes))
    return pruned, nodes


@dataclass(frozen=True)
class TreeVerdict:
    paths: list[list[int]]  # per row, the accepted nodes from the root down
    next_tokens: torch.Tensor  # [B] correction or bonus token

    @property
    def accepted(self) -> torch.Tensor:
        return torch.tensor([len(path) for path in self.paths], device=self.next_tokens.device)


def _children(tree: DraftTree, row: int) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(tree.parents[row].tolist()):
        children.setdefault(parent, []).append(node)
    return children


def verify_tree_greedy(tree: DraftTree, *, target_logits: torch.Tensor) -> TreeVerdict:
    """target_logits [B, 1+N, V]: entry 0 predicts the first drafted position, entry 1+i the child of node i."""
    choices = target_logits.argmax(dim=-1).tolist()
    tokens = tree.tokens.tolist()
    paths, next_tokens = [], []
    for row in range(len(tokens)):
        children, path, current = _children(tree, row), [], -1
        while True:
            wanted = choices[row][current + 1]
            match = [c for c in children.get(current, []) if tokens[row][c] == wanted]
            if not match:
                break
            current = match[0]
            path.append(current)
        paths.append(path)
        next_tokens.append(choices[row][current + 1])
    return TreeVerdict(paths, torch.tensor(next_tokens, device=tree.tokens.device))


def verify_tree_sampled(
    tree: DraftTree, *, target_probs: torch.Tensor, generator: torch.Generator | None = None
) -> TreeVerdict:
    """target_probs [B, 1+N, V], after the same temperature / top-p the draft used. Child c of a node
    is accepted when u_c < p'(c) / sum(p'), p' being p with the children rejected before it zeroed;
    each child is tried at most once per step, so one uniform per node, drawn up front, is enough."""
    batch, nodes = tree.tokens.shape
    tokens = tree.tokens.tolist()
    uniform = torch.rand(batch, nodes, generator=generator, device=target_probs.device).tolist()
    final = torch.empty(batch, target_probs.shape[-1], dtype=target_probs.dtype, device=target_probs.device)
    paths = []
    for row in range(batch):
        children, path, current = _children(tree, row), [], -1
        while True:
            probs = target_probs[row, current + 1]
            tried = children.get(current, [])
            child_probs = probs[[tokens[row][child] for child in tried]].tolist() if tried else []
            total, rejected = float(probs.sum()), set()
            for child, child_prob in zip(tried, child_probs, strict=True):
                token = tokens[row][child]
                mass = 0.0 if token in rejected else child_prob  # a repeated token was zeroed already
                if uniform[row][child] * total < mass:
                    break
                rejected.add(token)
                total -= mass
            else:  # every child rejected, or a leaf: the next token from what is left of p
                leftover = probs.clone()
                leftover[list(rejected)] = 0.0
                final[row] = leftover if bool(leftover.sum() > 0) else probs  # float rounding can leave nothing
                break
            current = child
            path.append(current)
        paths.append(path)
    next_tokens = torch.multinomial(final, 1, generator=generator).squeeze(1)  # unnormalised rows are fine
    return TreeVerdict(paths, next_tokens)
