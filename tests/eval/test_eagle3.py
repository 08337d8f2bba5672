"""The EAGLE-3 training-time test against the inference it imitates: for every position t, draft
K steps one at a time with a cache holding the step-0 keys of positions <= t (target features) and
the draft's own keys, feeding its output back as the next step's features."""

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
