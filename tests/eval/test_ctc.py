"""The CTC drafter (eval/drafters/ctc.py): collapsing a path, the beam's best paths and their prefix
tree, the padding of trees of different sizes (which neither verifier may take), the session's chain
and tree on given frames, the training forward against the session and against the formula of the
module docstring, the session across commits, lossless decoding through the engine (greedy and
sampled, chain and tree), and the drafter's directory."""

import itertools
import json

import pytest
import torch
from transformers import LlamaConfig

from specdec.eval import SpecConfig, generate
from specdec.eval.drafters import DrafterLoadError
from specdec.eval.drafters.ctc import (
    CtcDrafter,
    CtcModel,
    beam_paths,
    collapse,
    is_ctc_dir,
    load_ctc,
    pad_trees,
    prefix_tree,
    save_ctc,
)
from specdec.eval.tree import DraftTree, ancestor_mask, verify_tree_greedy, verify_tree_sampled
from specdec.eval.verify import Sampling
from tests.eval.helpers import PlannedAcceptance, chi_square_p_value, first_pair_counts, hf_greedy, tiny_lm

TARGET = tiny_lm(seed=0)
LAYERS = (2,)  # the 2-layer target's final normed state (HF output_hidden_states id)


def _trainable_normal(model: CtcModel, std: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def _ctc(target, *, draft_ids: list[int], blank: int, frames: int, std: float = 0.2, seed: int = 2) -> CtcModel:
    """A CTC drafter over `target` with random weights; draft id i is target id draft_ids[i]."""
    model = CtcModel(
        target.config,
        draft_vocab_size=len(draft_ids),
        frames=frames,
        blank=blank,
        embed_tokens=target.model.embed_tokens,
    )
    _trainable_normal(model, std, seed)
    used = torch.tensor(draft_ids)
    with torch.no_grad():
        model.d2t.copy_(used - torch.arange(len(draft_ids)))
        model.t2d.zero_()[used] = True
    return model.eval()


def _context(prompt: list[int], target=TARGET) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """begin's arguments for one prompt: its context, the context's mask and final target states."""
    ids = torch.tensor([prompt[:-1]])
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states
    return ids, torch.ones_like(ids), torch.stack([hidden[i] for i in LAYERS], dim=2)


# ---- collapse, beam paths, prefix trees, padding ----

A, B_, C, BLANK = 1, 2, 3, 0


def test_collapse_merges_repeats_then_drops_blanks() -> None:
    assert collapse([A, A, BLANK, A, B_, B_], BLANK) == [A, A, B_]  # "a a - a b b" -> "a a b"
    assert collapse([A, BLANK, BLANK, A], BLANK) == [A, A]  # blanks dropped first would give [a]
    assert collapse([A, BLANK, A], BLANK) == [A, A]  # a blank between repeats keeps both
    assert collapse([A, A, A], BLANK) == [A]
    assert collapse([BLANK, BLANK, BLANK], BLANK) == []
    assert collapse([], BLANK) == []
    assert collapse([BLANK, A, A, BLANK, C], BLANK) == [A, C]
    assert collapse([5, 0, 0, 5, 5], blank=5) == [0]  # the blank is whichever id it is told


def test_beam_paths_are_the_best_paths_by_total_log_probability() -> None:
    """Against every path of 4 frames over 5 symbols, enumerated."""
    generator = torch.Generator().manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(2, 4, 5, generator=generator), dim=-1)
    paths, scores = beam_paths(logprobs, 6)
    assert paths.shape == (2, 6, 4) and scores.shape == (2, 6)
    for row in range(2):
        every = sorted(
            (
                (sum(float(logprobs[row, frame, symbol]) for frame, symbol in enumerate(path)), list(path))
                for path in itertools.product(range(5), repeat=4)
            ),
            reverse=True,
        )[:6]
        assert paths[row].tolist() == [path for _, path in every]
        torch.testing.assert_close(scores[row], torch.tensor([score for score, _ in every]))


def test_the_prefix_tree_merges_duplicates_prefixes_and_shared_prefixes_in_order_of_appearance() -> None:
    paths = [[5, 6, 7], [5, 6, 7], [5, 6], [5, 8], [9], [5, 6, 9]]
    tokens, parents = prefix_tree(paths)
    # 5 -> 6 -> 7 once, [5, 6] adds nothing, 8 is a second child of 5 (after 6: first appearance),
    # 9 under the root and 9 under 6 are different nodes
    assert tokens == [5, 6, 7, 8, 9, 9]
    assert parents == [-1, 0, 1, 0, -1, 1]
    assert all(parent < node for node, parent in enumerate(parents))
    assert prefix_tree([[5], [5, 6]]) == ([5, 6], [-1, 0])  # the shorter first: the longer extends it
    assert prefix_tree([]) == ([], [])


def test_trees_of_different_sizes_are_padded_with_copies_of_their_last_node() -> None:
    trees = [([5, 6, 7], [-1, 0, 1]), ([4], [-1]), ([1, 2], [-1, -1])]
    tree = pad_trees(trees, torch.device("cpu"))
    assert tree.tokens.tolist() == [[5, 6, 7], [4, 4, 4], [1, 2, 2]]
    assert tree.parents.tolist() == [[-1, 0, 1], [-1, -1, -1], [-1, -1, -1]]
    assert tree.sizes.tolist() == [3, 1, 2]  # what the engine records as drafted per row


def _logits_favouring(choices: list[list[int]], vocab: int = 64) -> torch.Tensor:
    """Target logits [B, 1+N, V] whose argmax at block entry i is choices[b][i]."""
    logits = torch.zeros(len(choices), len(choices[0]), vocab)
    for row, row_choices in enumerate(choices):
        for entry, token in enumerate(row_choices):
            logits[row, entry, token] = 5.0
    return logits


def test_the_greedy_verifier_never_takes_a_padded_copy() -> None:
    """Row 0 is a chain 5 -> 6 padded with two copies of node 1 (token 6 under node 0); row 1 is two
    children of the root, 3 and 4, padded with copies of 4. The target wants the copied tokens: the
    originals are taken, the path and next token are those of the unpadded row, and a copy's own
    entry (whose argmax would give another next token) is never read."""
    trees = [([5, 6], [-1, 0]), ([3, 4], [-1, -1]), ([7, 8, 9, 10], [-1, 0, 1, 2])]
    tree = pad_trees(trees, torch.device("cpu"))
    assert tree.tokens.shape == (3, 4)
    # entries: root, node 0..3; copies sit at nodes 2, 3 of rows 0 and 1
    logits = _logits_favouring([[5, 6, 11, 60, 61], [4, 50, 12, 60, 61], [7, 8, 9, 13, 14]])
    verdict = verify_tree_greedy(tree, target_logits=logits)
    assert verdict.paths == [[0, 1], [1], [0, 1, 2]]
    assert verdict.next_tokens.tolist() == [11, 12, 13]
    for row, (tokens, parents) in enumerate(trees):
        alone = verify_tree_greedy(
            DraftTree(torch.tensor([tokens]), torch.tensor([parents])),
            target_logits=logits[row : row + 1, : 1 + len(tokens)],
        )
        assert alone.paths[0] == verdict.paths[row]
        assert alone.next_tokens.tolist() == [verdict.next_tokens[row].item()]


def test_the_sampled_verifier_never_takes_a_padded_copy_and_keeps_the_target_law() -> None:
    """Root children 3 (p = 0) and 4 (p = 1/2), then two copies of node 4. Node 4 is accepted with
    probability 1/2; once it is rejected its copies have no mass left, and the emitted token is never
    4: the first token is 4 with probability exactly p(4) = 1/2 (a copy that kept 4's mass would be
    accepted whenever node 4 is not, making it 1)."""
    rows = 4000
    tree = pad_trees([([3, 4], [-1, -1]), ([1, 2, 5, 0], [-1, -1, -1, -1])], torch.device("cpu"))
    padded = DraftTree(tree.tokens[:1].expand(rows, -1), tree.parents[:1].expand(rows, -1))
    assert padded.tokens[0].tolist() == [3, 4, 4, 4]
    root = torch.tensor([0.0, 0.1, 0.1, 0.0, 0.5, 0.1, 0.2])
    probs = torch.full((rows, 5, 7), 1 / 7)
    probs[:, 0] = root
    verdict = verify_tree_sampled(padded, target_probs=probs, generator=torch.Generator().manual_seed(0))
    assert {tuple(path) for path in verdict.paths} <= {(), (1,)}
    taken = torch.tensor([path == [1] for path in verdict.paths])
    assert 0.45 < taken.float().mean() < 0.55
    assert set(verdict.next_tokens[~taken].tolist()) <= {1, 2, 5, 6}  # never 3 (p = 0) nor the rejected 4


# ---- the session on given frames ----

DRAFT_IDS = [63, 10, 21, 32, 43, 54]  # draft id i is target id DRAFT_IDS[i]; draft id 0 is the blank


class GivenFrames(CtcDrafter):
    """The session with its frames' log-probabilities [B, T, V_d] given instead of computed."""

    def __init__(self, frames: torch.Tensor) -> None:
        super().__init__(_ctc(TARGET, draft_ids=DRAFT_IDS, blank=BLANK, frames=frames.shape[1]), LAYERS)
        self.given = frames

    def _frames(self, pending: torch.Tensor) -> torch.Tensor:
        return self.given


def _frames(rows: list[list[dict[int, float]]], vocab: int = len(DRAFT_IDS)) -> torch.Tensor:
    """Frames [B, T, V]: per row, per frame, the log-probabilities given; -20 elsewhere."""
    frames = torch.full((len(rows), len(rows[0]), vocab), -20.0)
    for row, row_frames in enumerate(rows):
        for frame, given in enumerate(row_frames):
            for symbol, logprob in given.items():
                frames[row, frame, symbol] = logprob
    return frames


def _argmax_frames(paths: list[list[int]]) -> torch.Tensor:
    return _frames([[{symbol: -0.1} for symbol in path] for path in paths])


PENDING = torch.tensor([7, 8, 9])


def test_the_chain_is_the_argmax_path_collapsed_cut_to_k_in_target_ids() -> None:
    paths = [[A, A, BLANK, B_], [BLANK] * 4, [C, 4, 5, A]]  # -> [a, b]; nothing; [c, 4, 5, a] cut to 3
    proposal = GivenFrames(_argmax_frames(paths)).propose_chain(PENDING, 3, Sampling(), None)
    assert proposal.tokens.tolist() == [[10, 21, 7], [8, 8, 8], [32, 43, 54]]  # padded with the pending token
    assert proposal.lengths.tolist() == [2, 0, 3]
    assert proposal.probs is None
    sampled = GivenFrames(_argmax_frames(paths)).propose_chain(PENDING, 2, Sampling(temperature=1.0), None)
    assert sampled.tokens.tolist() == [[10, 21], [8, 8], [32, 43]]
    assert sampled.lengths.tolist() == [2, 0, 2]
    assert sampled.probs.shape == (3, 2, 64)  # one-hot proposals over the target vocabulary
    assert torch.equal(sampled.probs, torch.nn.functional.one_hot(sampled.tokens, 64).float())


def test_a_chain_of_rows_that_all_collapse_to_nothing_drafts_nothing() -> None:
    proposal = GivenFrames(_argmax_frames([[BLANK] * 3, [BLANK] * 3])).propose_chain(PENDING[:2], 3, Sampling(), None)
    assert proposal.tokens.tolist() == [[7], [8]]
    assert proposal.lengths.tolist() == [0, 0]


# Row 0's best 4 paths: a a b (-0.4), a - b (-0.7), a a - (-1.0), a c b (-1.1): collapsed [a, b] twice,
# [a] (covered), [a, c, b]; then come a - - (-1.3), a c - (-1.7). Row 1's: c e - (-0.2), d e - (-0.4),
# - e - (-1.1), c - - (-2.15): collapsed [c, e], [d, e], [e], [c] (covered); then d - - (-2.35).
TREE_FRAMES = _frames(
    [
        [{A: -0.1, B_: -1.5, BLANK: -3.0}, {A: -0.2, BLANK: -0.5, C: -0.9}, {B_: -0.1, BLANK: -0.7, A: -2.5}],
        [{C: -0.1, 4: -0.3, BLANK: -1.0}, {5: -0.05, BLANK: -2.0}, {BLANK: -0.05}],
    ]
)


def _mask_from_parents(parents: list[list[int]]) -> torch.Tensor:
    """[B, 1+N, 1+N]: entry 1+i sees the root, itself and the nodes up its chain of parents."""
    masks = []
    for row in parents:
        mask = torch.zeros(len(row) + 1, len(row) + 1, dtype=torch.bool)
        mask[:, 0] = True
        for node in range(len(row)):
            up = node
            while up != -1:
                mask[node + 1, up + 1] = True
                up = row[up]
        masks.append(mask)
    return torch.stack(masks)


def test_the_tree_is_the_prefix_tree_of_the_beams_collapsed_paths_in_target_ids() -> None:
    tree = GivenFrames(TREE_FRAMES).propose_tree(PENDING[:2], depth=3, width=4)
    # row 0: a, b under a, c under a (siblings by score), b under c, then a copy of that b;
    # row 1: c, e under c, d, e under d, e under the root (nodes in the order of the paths' scores)
    parents = [[-1, 0, 0, 2, 2], [-1, 0, -1, 2, -1]]
    assert tree.tokens.tolist() == [[10, 21, 32, 21, 21], [32, 54, 43, 54, 54]]
    assert tree.parents.tolist() == parents
    assert torch.equal(ancestor_mask(tree), _mask_from_parents(parents))
    shallow = GivenFrames(TREE_FRAMES).propose_tree(PENDING[:2], depth=2, width=4)  # [a, c, b] cut to [a, c]
    assert shallow.tokens.tolist() == [[10, 21, 32, 32, 32], [32, 54, 43, 54, 54]]
    assert shallow.parents.tolist() == [[-1, 0, 0, 0, 0], [-1, 0, -1, 2, -1]]


def test_a_tree_whose_paths_all_collapse_to_nothing_is_frame_0s_best_token_that_is_not_blank() -> None:
    frames = _frames(
        [
            [{BLANK: -0.01, 4: -2.0, C: -3.0}, {BLANK: -0.01}, {BLANK: -0.01}],  # the best path is all blank
            [{A: -0.1}, {A: -0.1}, {B_: -0.1}],
        ]
    )
    tree = GivenFrames(frames).propose_tree(PENDING[:2], depth=3, width=1)
    assert tree.tokens.tolist() == [[43, 43], [10, 21]]  # draft id 4, then its copy
    assert tree.parents.tolist() == [[-1, -1], [-1, 0]]
    assert torch.equal(ancestor_mask(tree), _mask_from_parents([[-1, -1], [-1, 0]]))


def test_with_no_context_to_read_the_session_drafts_repeats_of_the_pending_token() -> None:
    """A one-token prompt: no target state yet, so no frames."""
    session = CtcDrafter(_ctc(TARGET, draft_ids=DRAFT_IDS, blank=BLANK, frames=3), LAYERS)
    session.begin(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), None)
    chain = session.propose_chain(PENDING[:2], 3, Sampling(), None)
    assert chain.tokens.tolist() == [[7, 7, 7], [8, 8, 8]] and chain.lengths is None
    session.begin(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), None)
    tree = session.propose_tree(PENDING[:2], 2, 3)
    assert tree.tokens.tolist() == [[7, 7], [8, 8]] and tree.parents.tolist() == [[-1, 0], [-1, 0]]


# ---- the training forward against the session and the formula ----

CONFIG = LlamaConfig(
    vocab_size=50, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8
)
FRAMES, V_D = 3, 20


def _float64_model() -> CtcModel:
    model = CtcModel(CONFIG, draft_vocab_size=V_D, frames=FRAMES, blank=4, embed_tokens=torch.nn.Embedding(50, 32))
    _trainable_normal(model, 0.3, seed=0)  # far from identity norms, so a wrong mask or position shows
    return model.double().eval()


def _training_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two samples of 7 positions, the second of 5 and right-padded: (target_hidden [2, 7, H],
    tokens [2, 8]: x_0..x_7, attention_mask [2, 7])."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 32, generator=generator, dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 8), generator=generator)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    hidden[1, 5:] = 100.0  # padding that would show if read
    return hidden, tokens, mask


def test_the_training_frames_are_the_frames_the_session_computes_after_each_prefix() -> None:
    model = _float64_model()
    hidden, tokens, mask = _training_batch()
    windows = mask.bool()
    with torch.no_grad():
        trained = model.train_frames(
            target_hidden=hidden, next_ids=tokens[:, 1:], attention_mask=mask, windows=windows
        )  # [W, T, V_d] in (b, t) order
    expected = torch.log_softmax(trained.float(), dim=-1)
    places = [(b, t) for b in range(2) for t in range(7) if mask[b, t]]
    assert trained.shape == (len(places), FRAMES, V_D)
    for (b, t), frames in zip(places, expected, strict=True):
        session = CtcDrafter(model, LAYERS)  # window t: the context x_0..x_t, pending x_{t+1}
        session.begin(
            tokens[b : b + 1, : t + 1], torch.ones(1, t + 1, dtype=torch.long), hidden[b : b + 1, : t + 1, None]
        )
        torch.testing.assert_close(session._frames(tokens[b : b + 1, t + 1])[0], frames, rtol=1e-5, atol=1e-5)
    # both samples in one session, the shorter left-padded: its last window
    session = CtcDrafter(model, LAYERS)
    left_ids = torch.stack([tokens[0, :7], torch.cat([torch.zeros(2, dtype=torch.long), tokens[1, :5]])])
    left_hidden = torch.stack([hidden[0], torch.cat([torch.full((2, 32), 100.0, dtype=torch.float64), hidden[1, :5]])])
    session.begin(left_ids, mask.flip(1), left_hidden[:, :, None])
    last = [places.index((0, 6)), places.index((1, 4))]
    torch.testing.assert_close(
        session._frames(torch.stack([tokens[0, 7], tokens[1, 5]])), expected[last], rtol=1e-5, atol=1e-5
    )


def _reference_frames(model: CtcModel, hidden, next_ids, mask, windows) -> torch.Tensor:
    """The module docstring, one window and one slot at a time: c_t = fc([embed_norm(e(x_{t+1})) ;
    hidden_norm(h_t)]), s = c_t + slot_j at position t + j (j = 1..T), attending to the keys of the
    real c_1..c_t and to its own key, then the residuals, the MLP and the head."""
    attention, scale = model.self_attn, model.self_attn.head_dim**-0.5

    def project(x: torch.Tensor, position: int):
        x = model.input_layernorm(x).view(1, 1, -1)
        cos, sin = model.rotary_emb(x, torch.tensor([[position]]))
        q, k, v = attention.project(x, cos, sin)
        return q[0, :, 0], k[0, :, 0], v[0, :, 0]  # [nh, hd]

    out = []
    for b in range(len(hidden)):
        embedded = model.embed_norm(model.embed_tokens(next_ids[b]).double())
        entries = model.fc(torch.cat([embedded, model.hidden_norm(hidden[b])], dim=-1))  # [T, H]
        for t in range(len(entries)):
            if not windows[b, t]:
                continue
            context = [project(entries[s], s)[1:] for s in range(t + 1) if mask[b, s]]
            frames = []
            for j in range(1, model.frames + 1):
                slot = entries[t] + model.slots[j - 1]
                q, k, v = project(slot, t + j)
                keys = torch.stack([key for key, _ in context] + [k], dim=1)  # [nh, n + 1, hd]
                values = torch.stack([value for _, value in context] + [v], dim=1)
                weights = torch.softmax((q[:, None] * keys).sum(-1) * scale, dim=-1)
                attended = (weights[..., None] * values).sum(1).reshape(-1)
                o = slot + attention.o_proj(attended)
                o = o + model.mlp(model.post_attention_layernorm(o))
                frames.append(model.lm_head(model.norm(o)))
            out.append(torch.stack(frames))
    return torch.stack(out)


def test_the_training_frames_follow_the_formula_window_by_window() -> None:
    model = _float64_model()
    hidden, tokens, mask = _training_batch()
    windows = torch.zeros(2, 7, dtype=torch.bool)
    windows[0, [0, 3, 6]] = True
    windows[1, [1, 4]] = True  # the second sample's last real position: the padding after it unread
    with torch.no_grad():
        trained = model.train_frames(target_hidden=hidden, next_ids=tokens[:, 1:], attention_mask=mask, windows=windows)
        expected = _reference_frames(model, hidden, tokens[:, 1:], mask, windows)
    assert trained.shape == (5, FRAMES, V_D)
    # float64 weights; the attention scores are taken in float32 on purpose (a wrong mask, position or
    # key moves them by far more)
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-6)


def test_a_batch_without_windows_has_no_training_frames() -> None:
    """The CTC objective handles W = 0 (it returns a zero loss); the forward must get there."""
    model = _float64_model()
    hidden, tokens, mask = _training_batch()
    with torch.no_grad():
        trained = model.train_frames(
            target_hidden=hidden,
            next_ids=tokens[:, 1:],
            attention_mask=mask,
            windows=torch.zeros(2, 7, dtype=torch.bool),
        )
    assert trained.shape == (0, FRAMES, V_D)


# ---- the session across commits ----

PROMPTS = [[1, 5, 7, 9, 11], [1, 3], [1, 20, 21, 22, 23, 24, 25, 30], [4]]
NEW_TOKENS = 24
REFERENCE = [hf_greedy(TARGET, prompt, NEW_TOKENS) for prompt in PROMPTS]


class Recording(CtcDrafter):
    """The session, keeping the frames of its last step."""

    def _frames(self, pending: torch.Tensor) -> torch.Tensor | None:
        self.last = super()._frames(pending)
        return self.last


def _random_head() -> CtcModel:
    return _ctc(TARGET, draft_ids=list(range(0, 64, 2)), blank=5, frames=4)  # draft id 5: target id 10


# fp32 throughout: the engine's session reads target states from cached, left-padded, batched
# forwards and a fresh one from a plain forward, so they differ by float32 rounding
SESSION_RTOL, SESSION_ATOL = 1e-5, 1e-5


def test_after_commits_the_session_drafts_what_a_fresh_session_on_the_accepted_prefix_drafts() -> None:
    """B = 3 prompts of different lengths, a planned number of accepted drafts that differs per row
    and step: at every step, each row drafts the frames and the chain of a fresh session begun on its
    accepted prefix."""
    prompts, k = PROMPTS[:3], 3
    head = _random_head()
    session, records = Recording(head, LAYERS), []

    def record(rows, done, proposal) -> None:
        for row, index in enumerate(rows):
            tokens = proposal.tokens[row, : int(proposal.lengths[row])].tolist()
            records.append((index, done[index], tokens, session.last[row]))

    drafter = PlannedAcceptance(session, REFERENCE, record)
    result = generate(TARGET, prompts, drafter=drafter, cfg=SpecConfig(k=k, max_new_tokens=16), eos_token_ids=set())
    assert result.new_tokens == [reference[:16] for reference in REFERENCE[:3]]
    assert len({tuple(row) for row in result.accepted}) == 3  # the rows advanced differently
    assert len(records) > 3 * 5
    assert len({len(tokens) for _, _, tokens, _ in records}) > 1  # chains of different lengths
    for index, done, tokens, frames in records:
        prefix = prompts[index] + REFERENCE[index][:done]
        fresh = Recording(head, LAYERS)
        fresh.begin(*_context(prefix))
        expected = fresh.propose_chain(torch.tensor(prefix[-1:]), k, Sampling(), None)
        assert tokens == expected.tokens[0, : int(expected.lengths[0])].tolist(), (index, done)
        torch.testing.assert_close(frames, fresh.last[0], rtol=SESSION_RTOL, atol=SESSION_ATOL)


# ---- lossless decoding ----


def _bigram_head() -> CtcModel:
    """Frames that are the target's own distribution at the pending token's predecessor (its argmax
    is the pending token a, once decoding), slightly moved apart per slot, with draft id a standing
    for the token that follows a in the target's greedy decodes: short chains, often accepted. The
    blank is 46, which the decodes repeat: after it, the chain is often empty."""
    successor: dict[int, int] = {}
    for prompt, reference in zip(PROMPTS, REFERENCE, strict=True):
        sequence = prompt[-1:] + reference
        for token, after in itertools.pairwise(sequence):
            successor.setdefault(token, after)
    head = _ctc(TARGET, draft_ids=[successor.get(token, token) for token in range(64)], blank=46, frames=4)
    with torch.no_grad():
        for parameter in head.parameters():
            if parameter.requires_grad:
                parameter.zero_()  # no attention, no MLP: o = c_t = hidden_norm(h_t)
        for norm in (head.embed_norm, head.hidden_norm, head.input_layernorm, head.post_attention_layernorm, head.norm):
            norm.weight.fill_(1.0)
        head.fc.weight[:, 32:] = torch.eye(32)
        head.lm_head.weight.copy_(TARGET.lm_head.weight)
        head.slots.copy_(torch.randn(4, 32, generator=torch.Generator().manual_seed(3)) * 0.1)
    return head


@pytest.mark.parametrize("tree_width", [1, 3], ids=["chain", "tree"])
def test_greedy_output_with_a_ctc_drafter_is_the_targets_own(tree_width: int) -> None:
    """Single prompts and a batch of prompts of different lengths (a one-token prompt included), with
    a random head (drafts of every length, mostly rejected) and a head whose drafts the target often
    accepts (and whose chain is empty after the blank)."""
    cfg = SpecConfig(k=3, tree_width=tree_width, max_new_tokens=NEW_TOKENS)
    head = _random_head()
    single = [generate(TARGET, [p], drafter=CtcDrafter(head, LAYERS), cfg=cfg, eos_token_ids=set()) for p in PROMPTS]
    batched = generate(TARGET, PROMPTS, drafter=CtcDrafter(head, LAYERS), cfg=cfg, eos_token_ids=set())
    assert [r.new_tokens[0] for r in single] == REFERENCE
    assert batched.new_tokens == REFERENCE
    assert len({n for r in [*single, batched] for row in r.drafted for n in row}) > 1  # chains or trees of sizes
    accepting = generate(TARGET, PROMPTS, drafter=CtcDrafter(_bigram_head(), LAYERS), cfg=cfg, eos_token_ids=set())
    assert accepting.new_tokens == REFERENCE
    accepted = [n for row in accepting.accepted for n in row]
    assert sum(accepted) / len(accepted) > 0.3
    if tree_width == 1:
        assert 0 in {n for row in accepting.drafted for n in row}  # an empty chain: the target decides alone


# Sampling losslessness on test_engine's 6-token target: the law of the first two new tokens, exactly.
from tests.eval.test_engine import ALPHA, SMALL_PROMPT, SMALL_TARGET, _exact_law  # noqa: E402


@pytest.mark.parametrize("tree_width", [1, 3], ids=["chain", "tree"])
def test_sampled_output_with_a_ctc_drafter_follows_the_target_distribution(tree_width: int) -> None:
    """8000 draws of the first two tokens, chi-square at ALPHA; drafts are accepted, not all of them."""
    head = _ctc(SMALL_TARGET, draft_ids=[0, 1, 3, 5], blank=2, frames=3, std=0.5, seed=4)  # the blank: target id 3
    cfg = SpecConfig(k=2, tree_width=tree_width, max_new_tokens=2, sampling=Sampling(temperature=1.0))
    result = generate(
        SMALL_TARGET,
        [SMALL_PROMPT] * 8000,
        drafter=CtcDrafter(head, LAYERS),
        cfg=cfg,
        eos_token_ids=set(),
        generator=torch.Generator().manual_seed(0),
    )
    counts = first_pair_counts(result.new_tokens)
    assert chi_square_p_value(counts, _exact_law()) > ALPHA
    accepted = [n for row in result.accepted for n in row]
    assert 0 < sum(accepted) < len(accepted)


# ---- its directory ----


def test_a_saved_drafter_loads_back_with_the_same_frames(tmp_path) -> None:
    config = LlamaConfig(
        **{**TARGET.config.to_dict(), "rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}}
    )
    model = _ctc(TARGET, draft_ids=list(range(0, 64, 2)), blank=5, frames=4)
    model.rotary_emb = type(model.rotary_emb)(config)  # a layer field that is not the default
    save_ctc(model, tmp_path, target_config=config, target_layers=LAYERS)
    assert is_ctc_dir(tmp_path) and not is_ctc_dir(tmp_path / "nothing")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["blank_token_id"] == 10  # draft id 5 is target id 10
    assert written["frames"] == 4 and written["draft_vocab_size"] == 32
    loaded, layers = load_ctc(tmp_path, TARGET)
    assert layers == LAYERS
    assert loaded.embed_tokens is TARGET.model.embed_tokens
    assert int(loaded.blank) == 5 and torch.equal(loaded.d2t, model.d2t) and torch.equal(loaded.t2d, model.t2d)
    hidden, tokens, mask = _training_batch()
    inputs = {
        "target_hidden": hidden.float(),
        "next_ids": tokens[:, 1:],
        "attention_mask": mask,
        "windows": mask.bool(),
    }
    with torch.no_grad():
        torch.testing.assert_close(loaded.train_frames(**inputs), model.train_frames(**inputs), rtol=0, atol=0)
        default = CtcModel(
            TARGET.config, draft_vocab_size=32, frames=4, blank=5, embed_tokens=TARGET.model.embed_tokens
        )
        default.load_state_dict(model.state_dict())
        assert not torch.allclose(default.train_frames(**inputs), model.train_frames(**inputs))  # theta counts


def test_a_drafter_of_another_targets_width_is_refused_naming_its_config(tmp_path) -> None:
    other = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1
    )
    model = CtcModel(other, draft_vocab_size=8, frames=2, blank=0, embed_tokens=torch.nn.Embedding(64, 16))
    save_ctc(model, tmp_path, target_config=other, target_layers=LAYERS)
    with pytest.raises(DrafterLoadError, match=r"config\.json.*hidden_size=16"):
        load_ctc(tmp_path, TARGET)
