"""The EAGLE-3 training-time test against the inference it imitates: for every position t, draft
K steps one at a time with a cache holding the step-0 keys of positions <= t (target features) and
the draft's own keys, feeding its output back as the next step's features."""

import pytest
import torch
from transformers import LlamaConfig

from specdec.eval.drafters.eagle3 import Eagle3Model

CONFIG = LlamaConfig(
    vocab_size=50, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8
)
B, T, K = 2, 6, 3


def _model() -> Eagle3Model:
    torch.manual_seed(0)
    model = Eagle3Model(CONFIG, draft_vocab_size=20, embed_tokens=torch.nn.Embedding(50, 32))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)  # far from identity norms, so a wrong mask or position shows
    return model.double()


def _project(model: Eagle3Model, token: int, features: torch.Tensor, position: int):
    layer = model.midlayer
    x = layer.attention_input(model.embed_tokens(torch.tensor([[token]])), features.view(1, 1, -1))
    cos, sin = model.rotary_emb(x, torch.tensor([[position]]))
    q, k, v = layer.self_attn.project(x, cos, sin)
    return q[0, :, 0], k[0, :, 0], v[0, :, 0]  # [nh, hd] each


def _reference(model, target_hidden, next_ids, mask) -> torch.Tensor:
    logits = torch.zeros(B, K, T, 20, dtype=torch.float64)
    head_dim = model.midlayer.self_attn.head_dim
    base = model.fc(target_hidden.flatten(2))
    padded = torch.nn.functional.pad(next_ids, (0, K))
    for b in range(B):
        context = [_project(model, int(next_ids[b, s]), base[b, s], s) for s in range(T)]
        for t in range(T):
            if not mask[b, t]:
                continue
            past = [(k, v) for s, (_, k, v) in enumerate(context[: t + 1]) if mask[b, s]]
            own, features = [], base[b, t]
            for step in range(K):
                q, k, v = _project(model, int(padded[b, t + step]), features, t + step)
                if step:
                    own.append((k, v))
                keys = torch.stack([key for key, _ in past + own], dim=1)  # [nh, n, hd]
                values = torch.stack([value for _, value in past + own], dim=1)
                weights = torch.softmax((q[:, None] * keys).sum(-1) / head_dim**0.5, dim=-1)
                attended = (weights[..., None] * values).sum(1).reshape(1, 1, -1)
                features = model.midlayer.finish(features.view(1, 1, -1), attended).view(-1)
                logits[b, step, t] = model.logits(features)
    return logits


def test_the_unrolled_steps_equal_step_by_step_drafting_with_a_cache() -> None:
    model = _model()
    generator = torch.Generator().manual_seed(1)
    target_hidden = torch.randn(B, T, 3, 32, generator=generator, dtype=torch.float64)
    next_ids = torch.randint(0, 50, (B, T), generator=generator)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # a shorter second sample, right-padded
    unrolled = model.unroll(target_hidden=target_hidden, next_ids=next_ids, attention_mask=mask, steps=K)
    expected = _reference(model, target_hidden, next_ids, mask)
    valid = mask.bool()[:, None, :].expand(B, K, T)
    # float64 weights, but the unroll takes its softmax in float32 on purpose: float32 rounding apart,
    # equal (a wrong mask, position or key shows at 1e-2 and above)
    torch.testing.assert_close(unrolled[valid], expected[valid], rtol=1e-5, atol=1e-6)


def test_the_embedding_is_shared_frozen_and_gets_no_gradient() -> None:
    model = _model().float()
    target_hidden = torch.randn(1, T, 3, 32)
    logits = model.unroll(
        target_hidden=target_hidden, next_ids=torch.randint(0, 50, (1, T)), attention_mask=torch.ones(1, T), steps=2
    )
    logits.sum().backward()
    assert model.embed_tokens.weight.grad is None and model.fc.weight.grad is not None
    assert {name for name, p in model.named_parameters() if p.requires_grad} >= {"fc.weight", "lm_head.weight"}


# The session inside the engine: a random head over a tiny target.
from specdec.eval import SpecConfig, generate  # noqa: E402
from specdec.eval.drafters.eagle3 import Eagle3Drafter  # noqa: E402
from specdec.eval.verify import Sampling  # noqa: E402
from tests.eval.helpers import PlannedAcceptance, hf_greedy, tiny_lm  # noqa: E402

TARGET = tiny_lm(seed=0)
LAYERS = (1, 1, 2)  # HF output_hidden_states ids of the 2-layer target


def _head(draft_vocab: int = 64) -> Eagle3Model:
    torch.manual_seed(2)
    head = Eagle3Model(TARGET.config, draft_vocab_size=draft_vocab, embed_tokens=TARGET.model.embed_tokens)
    with torch.no_grad():
        for parameter in head.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.2)
        used = torch.arange(0, 64, 64 // draft_vocab)  # every other token when the draft vocabulary is half
        head.d2t.copy_(used - torch.arange(draft_vocab))
        head.t2d.zero_()[used] = True
    return head.eval()


def test_the_session_drafts_what_the_training_unroll_computes() -> None:
    prompt = torch.tensor([[1, 5, 7, 9, 11, 13]])
    head, k = _head(32), 3
    with torch.no_grad():
        hidden = TARGET(prompt[:, :-1], output_hidden_states=True).hidden_states
    target_hidden = torch.stack([hidden[i] for i in LAYERS], dim=2)  # [1, T-1, 3, H]
    session = Eagle3Drafter(head, LAYERS)
    session.begin(prompt[:, :-1], torch.ones_like(prompt[:, :-1]), target_hidden)
    proposal = session.propose_chain(prompt[:, -1], k, Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    # The unroll with the drafts as the "gold" continuation: step k at the last context position.
    next_ids = torch.cat([prompt[:, 1:], proposal.tokens[:, :-1]], dim=1)
    padded_hidden = torch.cat([target_hidden, torch.zeros(1, k - 1, 3, 32)], dim=1)
    with torch.no_grad():
        logits = head.unroll(
            target_hidden=padded_hidden, next_ids=next_ids, attention_mask=torch.ones_like(next_ids), steps=k
        )
    last = prompt.shape[1] - 2
    expected = torch.softmax(logits[0, :, last], dim=-1)  # [K, V_d]
    torch.testing.assert_close(proposal.probs[0][:, head.t2d], expected, rtol=1e-4, atol=1e-6)
    assert proposal.probs[0][:, ~head.t2d].abs().max() == 0  # nothing outside the draft vocabulary


@pytest.mark.parametrize("tree_width", [1, 3], ids=["chain", "tree"])
def test_greedy_output_with_an_eagle3_head_is_the_targets_own(tree_width: int) -> None:
    prompts = [[1, 5, 7, 9, 11], [1, 3], [1, 20, 21, 22, 23, 24, 25, 30], [4]]
    reference = [hf_greedy(TARGET, prompt, 32) for prompt in prompts]
    cfg = SpecConfig(k=3, tree_width=tree_width, max_new_tokens=32)
    single = [
        generate(TARGET, [p], drafter=Eagle3Drafter(_head(32), LAYERS), cfg=cfg, eos_token_ids=set()) for p in prompts
    ]
    batched = generate(TARGET, prompts, drafter=Eagle3Drafter(_head(32), LAYERS), cfg=cfg, eos_token_ids=set())
    assert [r.new_tokens[0] for r in single] == reference
    assert batched.new_tokens == reference


def small_eagle3_head() -> Eagle3Model:
    """A random EAGLE-3 head over test_engine's 6-token target, with a draft vocabulary of 4 of its tokens."""
    from tests.eval.test_engine import SMALL_TARGET

    torch.manual_seed(4)
    head = Eagle3Model(SMALL_TARGET.config, draft_vocab_size=4, embed_tokens=SMALL_TARGET.model.embed_tokens)
    with torch.no_grad():
        for parameter in head.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5)
        head.d2t.copy_(torch.tensor([0, 0, 1, 2]))  # draft tokens 0..3 are target tokens 0, 1, 3, 5
        head.t2d.copy_(torch.tensor([True, True, False, True, False, True]))
    return head


def test_sampled_output_with_an_eagle3_head_follows_the_target_distribution() -> None:
    from tests.eval.helpers import chi_square_p_value
    from tests.eval.test_engine import ALPHA, SMALL_PROMPT, SMALL_TARGET, _exact_law

    head = small_eagle3_head()
    generator, counts = torch.Generator().manual_seed(0), torch.zeros(36, dtype=torch.float64)
    cfg = SpecConfig(k=2, max_new_tokens=2, sampling=Sampling(temperature=1.0))
    for _ in range(12):
        result = generate(
            SMALL_TARGET,
            [SMALL_PROMPT] * 1000,
            drafter=Eagle3Drafter(head.eval(), LAYERS),
            cfg=cfg,
            eos_token_ids=set(),
            generator=generator,
        )
        for a, b in (tokens[:2] for tokens in result.new_tokens):
            counts[a * 6 + b] += 1
    assert chi_square_p_value(counts, _exact_law()) > ALPHA


def test_a_tree_of_width_one_is_the_greedy_chain() -> None:
    prompt = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        hidden = TARGET(prompt[:, :-1], output_hidden_states=True).hidden_states
    target_hidden = torch.stack([hidden[i] for i in LAYERS], dim=2)
    proposals = []
    for tree in (False, True):
        session = Eagle3Drafter(_head(32), LAYERS)
        session.begin(prompt[:, :-1], torch.ones_like(prompt[:, :-1]), target_hidden)
        if tree:
            drafted = session.propose_tree(prompt[:, -1], depth=4, width=1)
            assert drafted.parents.tolist() == [[-1, 0, 1, 2]]
            proposals.append(drafted.tokens)
        else:
            proposals.append(session.propose_chain(prompt[:, -1], 4, Sampling(), None).tokens)
    assert proposals[0].tolist() == proposals[1].tolist()


def test_tree_drafts_children_are_the_top_tokens_under_their_parent() -> None:
    """Level 2 of a width-2 tree: the children kept are the best two by path log-probability among
    the children of both level-1 nodes, each scored by the session's chain drafting along that path."""
    prompt = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        hidden = TARGET(prompt[:, :-1], output_hidden_states=True).hidden_states
    target_hidden = torch.stack([hidden[i] for i in LAYERS], dim=2)
    head = _head(32)

    def session():
        drafter = Eagle3Drafter(head, LAYERS)
        drafter.begin(prompt[:, :-1], torch.ones_like(prompt[:, :-1]), target_hidden)
        return drafter

    tree = session().propose_tree(prompt[:, -1], depth=2, width=2)
    first = session().propose_chain(prompt[:, -1], 1, Sampling(temperature=1.0), None).probs[0, 0]
    candidates = []
    for node in range(2):
        token = tree.tokens[0, node]
        # the chain with this level-1 token forced: feed it and read the next distribution
        drafter = session()
        feature = drafter._feed_queue(prompt[:, -1])
        visible = torch.cat([drafter.mask.bool(), torch.ones(1, 1, dtype=torch.bool)], 1)
        with torch.no_grad():
            output = drafter._attend(feature, token.view(1, 1), torch.zeros(1, 1, dtype=torch.long), visible[:, None])
            second = drafter._target_probs(head.logits(output)[:, -1], Sampling(temperature=1.0))[0]
        for child in second.nonzero()[:, 0]:
            candidates.append((float(first[token].log() + second[child].log()), node, int(child)))
    best = sorted(candidates, reverse=True)[:2]
    assert [(parent, child) for _, parent, child in best] == list(
        zip(tree.parents[0, 2:].tolist(), tree.tokens[0, 2:].tolist(), strict=True)
    )


# fp32 throughout: the engine's session reads target features from cached, left-padded, batched
# forwards and a fresh one from a plain forward, so they differ by float32 rounding (2e-7 seen on
# these logits of size ~1); a queued entry one position off moves them by 3e-3.
SESSION_RTOL, SESSION_ATOL = 1e-5, 1e-5


def test_after_commits_the_session_drafts_what_a_fresh_session_on_the_accepted_prefix_drafts() -> None:
    """B = 3 prompts of different lengths (left padding), a planned number of accepted drafts that
    differs per row and step (the drafts are replaced by the target's continuation up to it): at
    every step, each row drafts the tokens and logits of a fresh session begun on its accepted prefix."""
    prompts = [[1, 5, 7, 9, 11], [1, 3, 8], [1, 20, 21, 22, 23, 24, 25, 30]]
    new_tokens, k = 16, 3
    references = [hf_greedy(TARGET, prompt, new_tokens) for prompt in prompts]
    head = _head(32)
    logits_seen = []  # [B, V_d] per draft step, read at the LM head
    hook = head.lm_head.register_forward_hook(lambda module, args, output: logits_seen.append(output[:, -1]))
    session, records = Eagle3Drafter(head, LAYERS), []

    def record(rows, done, proposal) -> None:
        logits = torch.stack(logits_seen, dim=1)  # [B, K, V_d] of this proposal
        logits_seen.clear()
        for row, index in enumerate(rows):
            records.append((index, done[index], proposal.tokens[row], logits[row]))

    drafter = PlannedAcceptance(session, references, record)

    try:
        result = generate(
            TARGET, prompts, drafter=drafter, cfg=SpecConfig(k=k, max_new_tokens=new_tokens), eos_token_ids=set()
        )
        assert result.new_tokens == references
        assert len({tuple(row) for row in result.accepted}) == 3  # the rows advanced differently
        assert len(records) > 3 * 5
        for index, done, tokens, logits in records:
            prefix = torch.tensor([prompts[index] + references[index][:done]])
            with torch.no_grad():
                hidden = TARGET(prefix[:, :-1], output_hidden_states=True).hidden_states
            fresh = Eagle3Drafter(head, LAYERS)
            fresh.begin(
                prefix[:, :-1], torch.ones_like(prefix[:, :-1]), torch.stack([hidden[i] for i in LAYERS], dim=2)
            )
            logits_seen.clear()
            expected = fresh.propose_chain(prefix[:, -1], k, Sampling(), None)
            assert tokens.tolist() == expected.tokens[0].tolist(), (index, done)
            torch.testing.assert_close(logits, torch.stack(logits_seen, dim=1)[0], rtol=SESSION_RTOL, atol=SESSION_ATOL)
    finally:
        hook.remove()
