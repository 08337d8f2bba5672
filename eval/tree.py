"""Tree drafts: EAGLE-style top-k expansion (Li et al., EAGLE-2, arXiv 2406.16858) verified in one
target forward under a tree attention mask (SpecInfer, arXiv 2305.09781; Medusa, arXiv 2401.10774).

A tree of depth D and width W holds D*W nodes in depth order; block entry 0 is the pending token
(the root) and entry 1+i is node i. Verification walks from the root:
- greedy: follow the child whose token is the target's argmax, as deep as it goes;
- sampling, with deterministic (top-k) children: at a node, with p = the target's distribution
  there, try the children in order; accept child c with probability p(c); on rejection set
  p(c) = 0 and renormalise; if every child is rejected, emit a token from what is left of p; at a
  leaf, emit a bonus token from p. Each step is a draw from p, so the output is lossless
  (objectives.md section 5.2, the EAGLE rule for top-k children).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    tokens: torch.Tensor  # [B, N] int64, N = depth * width, depth-major
    parents: torch.Tensor  # [B, N] int64, index of the parent node, -1 for children of the root
    depth: int
    width: int


def block_offsets(tree: DraftTree) -> torch.Tensor:
    """Position offset of each block entry [1 + N]: 0 for the root, the node's depth otherwise."""
    depths = torch.arange(1, tree.depth + 1, device=tree.tokens.device).repeat_interleave(tree.width)
    return torch.cat([torch.zeros(1, dtype=torch.long, device=depths.device), depths])


def ancestor_mask(tree: DraftTree) -> torch.Tensor:
    """[B, 1+N, 1+N] bool: block entry i may attend to entry j (itself, its ancestors, the root)."""
    batch, nodes = tree.tokens.shape
    mask = torch.zeros(batch, nodes + 1, nodes + 1, dtype=torch.bool, device=tree.tokens.device)
    mask[:, :, 0] = True
    mask[:, 0, 0] = True
    for node in range(nodes):  # parents come before their children, so their rows are complete
        parent = tree.parents[:, node]
        rows = torch.arange(batch, device=mask.device)
        mask[:, node + 1] = mask[rows, parent + 1]
        mask[:, node + 1, node + 1] = True
    return mask


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
    """target_probs [B, 1+N, V], after the same temperature / top-p the draft used."""
    tokens = tree.tokens.tolist()
    paths, next_tokens = [], []
    for row in range(len(tokens)):
        children, path, current = _children(tree, row), [], -1
        while True:
            probs = target_probs[row, current + 1].clone()
            for child in children.get(current, []):
                token = tokens[row][child]
                total = probs.sum()
                accept_probability = probs[token] / total if total > 0 else torch.zeros(())
                if torch.rand((), generator=generator, device=probs.device) < accept_probability:
                    break
                probs[token] = 0.0
            else:
                next_tokens.append(int(torch.multinomial(probs / probs.sum(), 1, generator=generator)))
                break
            current = child
            path.append(current)
        paths.append(path)
    return TreeVerdict(paths, torch.tensor(next_tokens, device=tree.tokens.device))
