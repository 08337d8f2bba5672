"""Tiny models and a chi-square test for the engine tests."""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.eval.drafters import ChainProposal
from specdec.eval.tree import DraftTree


def tiny_lm(vocab_size: int = 64, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def perturbed(model: LlamaForCausalLM, scale: float, seed: int = 1) -> LlamaForCausalLM:
    """The model with noise on every weight: a drafter that agrees with it some of the time."""
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in noisy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.std())
    return noisy


def sharpened(model: LlamaForCausalLM, scale: float) -> LlamaForCausalLM:
    """The model with its LM head scaled: peaked distributions, so temperature and top-p change them."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def hf_greedy(model: LlamaForCausalLM, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    output = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    return output[0, len(prompt) :].tolist()


class ConstantDrafter:
    """Always proposes the same token: with a token the target never emits, nothing is accepted."""

    target_layers: tuple[int, ...] = ()

    def __init__(self, token: int) -> None:
        self.token = token

    def begin(self, input_ids, attention_mask, target_hidden) -> None:
        pass

    def propose_chain(self, pending, k, sampling, generator) -> ChainProposal:
        return ChainProposal(torch.full((len(pending), k), self.token), None)

    def commit(self, block, kept, target_hidden) -> None:
        pass

    def select_rows(self, rows) -> None:
        pass


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's test of observed counts against exact probabilities, cells with fewer than
    `min_expected` expected draws merged into one; returns the p-value."""
    total = counts.sum()
    expected = probs * total
    small = expected < min_expected
    observed = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    expected = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2))


def _rows_to_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts: list[list[int]]) -> list[int]:
    """The prompt index of each batch row: `begin` sees each prompt minus its last token, left-padded."""
    keys = {tuple(prompt[:-1]): index for index, prompt in enumerate(prompts)}
    return [keys[tuple(ids[mask.bool()].tolist())] for ids, mask in zip(input_ids, attention_mask, strict=True)]


class ReferenceChainDrafter:
    """Drafts the known continuation of each prompt (the target's greedy decode), each row stopping
    at its own length, drawn per row and step from 0..K. The padding past a row's length is the
    continuation too, so the target would accept it: only the lengths keep it out. `log` holds, per
    step, (prompt index, drafted length) for each row."""

    target_layers: tuple[int, ...] = ()

    def __init__(self, prompts: list[list[int]], continuations: list[list[int]], seed: int = 0) -> None:
        self.prompts, self.continuations = prompts, continuations
        self.generator = torch.Generator().manual_seed(seed)
        self.log: list[list[tuple[int, int]]] = []

    def begin(self, input_ids, attention_mask, target_hidden) -> None:
        self.rows = _rows_to_prompts(input_ids, attention_mask, self.prompts)
        self.done = {index: 0 for index in self.rows}  # new tokens emitted per prompt

    def propose_chain(self, pending, k, sampling, generator) -> ChainProposal:
        lengths = torch.randint(0, k + 1, (len(self.rows),), generator=self.generator)
        drafts = []
        for index in self.rows:
            ahead = self.continuations[index][self.done[index] : self.done[index] + k]
            drafts.append(ahead + [0] * (k - len(ahead)))
        self.log.append(list(zip(self.rows, lengths.tolist(), strict=True)))
        return ChainProposal(torch.tensor(drafts), None, lengths)

    def commit(self, block, kept, target_hidden) -> None:
        for index, offsets in zip(self.rows, kept, strict=True):
            self.done[index] += len(offsets)

    def select_rows(self, rows) -> None:
        self.rows = [self.rows[r] for r in rows.tolist()]


def expected_accepted(log: list[list[tuple[int, int]]], num_prompts: int, max_new_tokens: int) -> list[list[int]]:
    """What the engine must record for a ReferenceChainDrafter: every drafted token is accepted, and
    the output keeps at most max_new_tokens (the drafts first, then the bonus token); a finished
    prompt has no more steps."""
    done, accepted = [0] * num_prompts, [[] for _ in range(num_prompts)]
    for step in log:
        for index, length in step:
            if done[index] == max_new_tokens:
                continue
            kept = min(length + 1, max_new_tokens - done[index])
            accepted[index].append(min(length, kept))
            done[index] += kept
    return accepted


class RaggedDrafter:
    """A real drafter whose chains are cut to a random length per row and step (0..K, seeded), the
    cut-off drafts replaced by `pad_token` while their draft probabilities stay: a verifier that
    read the padding would accept tokens that were never drawn from those probabilities."""

    def __init__(self, inner, seed: int = 0, pad_token: int = 0) -> None:
        self.inner, self.pad_token = inner, pad_token
        self.target_layers = inner.target_layers
        self.generator = torch.Generator().manual_seed(seed)
        self.lengths: list[list[int]] = []  # per step, per row

    def begin(self, input_ids, attention_mask, target_hidden) -> None:
        self.inner.begin(input_ids, attention_mask, target_hidden)

    def propose_chain(self, pending, k, sampling, generator) -> ChainProposal:
        proposal = self.inner.propose_chain(pending, k, sampling, generator)
        lengths = torch.randint(0, k + 1, (len(pending),), generator=self.generator)
        padding = torch.arange(k) >= lengths[:, None]
        self.lengths.append(lengths.tolist())
        return ChainProposal(proposal.tokens.masked_fill(padding, self.pad_token), proposal.probs, lengths)

    def commit(self, block, kept, target_hidden) -> None:
        self.inner.commit(block, kept, target_hidden)

    def select_rows(self, rows) -> None:
        self.inner.select_rows(rows)


# Two irregular shapes of 5 nodes (parents before children):
#   "fan":   the root has 3 children; the middle one carries a chain of 2   (parents -1 -1 -1 1 3)
#   "forks": a chain of 3 from the root, and a second child of the root with one child of its own
IRREGULAR_PARENTS = {"fan": [-1, -1, -1, 1, 3], "forks": [-1, 0, 1, -1, 3]}
IRREGULAR_PATH = {"fan": [1, 3, 4], "forks": [0, 1, 2]}  # the nodes of the depth-3 path


class ReferenceTreeDrafter:
    """Irregular trees around the known continuation c: even rows get "fan", odd rows "forks". The
    depth-3 path drafts c[0], c[1], and c[2] at even steps or a wrong token at odd ones; every other
    node is a wrong token. So the greedy verifier must accept 3 drafts at even steps, 2 at odd."""

    target_layers: tuple[int, ...] = ()

    def __init__(self, prompts: list[list[int]], continuations: list[list[int]], vocab_size: int) -> None:
        self.prompts, self.continuations, self.vocab_size = prompts, continuations, vocab_size
        self.steps = 0

    def begin(self, input_ids, attention_mask, target_hidden) -> None:
        self.rows = _rows_to_prompts(input_ids, attention_mask, self.prompts)
        self.done = {index: 0 for index in self.rows}

    def propose_tree(self, pending, depth, width) -> DraftTree:
        tokens, parents = [], []
        for row, index in enumerate(self.rows):
            shape = "fan" if row % 2 == 0 else "forks"
            ahead = self.continuations[index][self.done[index] : self.done[index] + 3]
            ahead += [0] * (3 - len(ahead))
            wrong = [(token + 1) % self.vocab_size for token in ahead]
            right = [ahead[0], ahead[1], ahead[2] if self.steps % 2 == 0 else wrong[2]]
            row_tokens = [wrong[0], wrong[1], wrong[0], wrong[1], wrong[2]]  # decoys at each node's depth
            for depth_index, node in enumerate(IRREGULAR_PATH[shape]):
                row_tokens[node] = right[depth_index]
            tokens.append(row_tokens)
            parents.append(IRREGULAR_PARENTS[shape])
        self.steps += 1
        return DraftTree(torch.tensor(tokens), torch.tensor(parents))

    def commit(self, block, kept, target_hidden) -> None:
        for index, offsets in zip(self.rows, kept, strict=True):
            self.done[index] += len(offsets)

    def select_rows(self, rows) -> None:
        self.rows = [self.rows[r] for r in rows.tolist()]


class FixedTreeDrafter:
    """The same irregular tree at every step, for the sampled verifier (children must not depend on
    the verifier's draws): the root's children are tokens 0, 2, 4 and under token 2 hangs 1 -> 5."""

    target_layers: tuple[int, ...] = ()

    def begin(self, input_ids, attention_mask, target_hidden) -> None:
        pass

    def propose_tree(self, pending, depth, width) -> DraftTree:
        batch = len(pending)
        return DraftTree(
            torch.tensor([[0, 2, 4, 1, 5]]).expand(batch, -1),
            torch.tensor([IRREGULAR_PARENTS["fan"]]).expand(batch, -1),
        )

    def commit(self, block, kept, target_hidden) -> None:
        pass

    def select_rows(self, rows) -> None:
        pass


class PlannedAcceptance:
    """A drafter that runs `session` (a drafter session) but drafts a planned number of accepted
    tokens: at step s, row i of prompt index j accepts (s + j) % (k + 1) drafts of references[j]
    (the target's own continuation), the next one made wrong, so rows advance differently while the
    session commits what the verifier kept. record(rows, done, proposal) sees each proposal of the
    session first: rows = the prompt index of each batch row, done = tokens generated per prompt."""

    def __init__(self, session, references: list[list[int]], record, vocab_size: int = 64) -> None:
        self.session, self.references, self.record, self.vocab_size = session, references, record, vocab_size
        self.target_layers = session.target_layers

    def begin(self, input_ids, attention_mask, target_hidden) -> None:
        self.session.begin(input_ids, attention_mask, target_hidden)
        self.rows, self.done, self.step = list(range(len(input_ids))), [0] * len(input_ids), 0

    def propose_chain(self, pending, k, sampling, generator) -> ChainProposal:
        proposal = self.session.propose_chain(pending, k, sampling, generator)
        self.record(self.rows, self.done, proposal)
        drafts = torch.zeros(len(pending), k, dtype=torch.long)
        for row, index in enumerate(self.rows):
            accept = (self.step + index) % (k + 1)
            ahead = self.references[index][self.done[index] : self.done[index] + k]
            ahead += [0] * (k - len(ahead))
            drafts[row, :accept] = torch.tensor(ahead[:accept])
            if accept < k:
                drafts[row, accept] = (ahead[accept] + 1) % self.vocab_size  # rejected
        self.step += 1
        return ChainProposal(drafts, None)

    def commit(self, block, kept, target_hidden) -> None:
        for index, offsets in zip(self.rows, kept, strict=True):
            self.done[index] += len(offsets)
        self.session.commit(block, kept, target_hidden)

    def select_rows(self, rows) -> None:
        self.rows = [self.rows[r] for r in rows.tolist()]
        self.session.select_rows(rows)


def first_pair_counts(new_tokens: list[list[int]], vocab_size: int = 6) -> torch.Tensor:
    """How often each (first, second) token pair was generated: the cells of the chi-square tests."""
    counts = torch.zeros(vocab_size * vocab_size, dtype=torch.float64)
    for a, b in (tokens[:2] for tokens in new_tokens):
        counts[a * vocab_size + b] += 1
    return counts
