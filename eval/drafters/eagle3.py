"""The EAGLE-3 drafter (Li et al., "EAGLE-3", arXiv 2503.01840): one decoder layer over the
target's fused features and the token embedding, with its own norm and LM head over a draft
vocabulary.

    g_t    = fc([h^a_t ; h^b_t ; h^c_t])                     three target layers at t: [3H] -> [H]
    x_t    = [input_layernorm(e(x_{t+1})) ; hidden_norm(g_t)]  [2H], the attention input
    o_t    = g_t + attn(x)_t ;  o_t = o_t + mlp(post_attention_layernorm(o_t))
    q(. | x_{<=t+1}) = softmax(lm_head(norm(o_t)))           over V_d tokens; target id = draft id + d2t

Drafting the next token feeds o_t back in place of g (the target's features exist only for accepted
tokens). Training unrolls the same way (the training-time test): at step k the query at position t
stands for position t+k, attends to the step-0 keys at positions <= t and to its own keys from
steps 1..k at position t. Parameter and buffer names follow the native EAGLE-3 checkpoint that
SGLang and vLLM load (fc, midlayer.*, norm, lm_head, d2t, t2d); the embedding is the target's,
frozen and not saved. Checked against SpecForge modeling/draft/llama3_eagle.py (a6b6b02).
Its inference session (the engine's Drafter, registered as "eagle3") and its training loop are #5.
"""

import math

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)


class Eagle3Attention(nn.Module):
    """Llama attention whose q, k, v read the 2H-wide [embedding ; features] input."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        width, bias = 2 * config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(width, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, 2H] -> q [B, nh, T, hd], k and v [B, nh, T, hd] (kv heads repeated), with RoPE."""
        batch, time, _ = x.shape
        q = self.q_proj(x).view(batch, time, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, time, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, time, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        repeat = self.heads // self.kv_heads
        return q, k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)


class Eagle3Layer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def attention_input(self, embedding: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(embedding), self.hidden_norm(features)], dim=-1)

    def finish(self, features: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residuals around attention (its output [B, T, nh*hd]) and the MLP: the layer output o."""
        hidden = features + self.self_attn.o_proj(attended)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Model(nn.Module):
    def __init__(self, target_config: LlamaConfig, *, draft_vocab_size: int, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        config = target_config
        hidden = config.hidden_size
        self.embed_tokens = embed_tokens.requires_grad_(False)  # the target's, shared
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(output))

    def unroll(
        self,
        *,
        target_hidden: torch.Tensor,  # [B, T, 3, H]: the three target layers at each position
        next_ids: torch.Tensor,  # [B, T]: the token after each position (x_{t+1})
        attention_mask: torch.Tensor,  # [B, T]: 1 on real positions
        steps: int,
    ) -> torch.Tensor:
        """The training-time test: draft logits [B, K, T, V_d]; step k at t predicts x_{t+k+2}."""
        batch, time = next_ids.shape
        layer, attention = self.midlayer, self.midlayer.self_attn
        features = self.fc(target_hidden.flatten(2))
        positions = torch.arange(time, device=next_ids.device).expand(batch, -1)
        causal = torch.ones(time, time, dtype=torch.bool, device=next_ids.device).tril()
        visible = causal[None] & attention_mask.bool()[:, None, :]  # step-0 keys: s <= t, real
        scale = 1 / math.sqrt(attention.head_dim)
        keys, values, logits = [], [], []
        for step in range(steps):
            ids = torch.nn.functional.pad(next_ids[:, step:], (0, step))  # x_{t+1+step}
            cos, sin = self.rotary_emb(features, positions + step)
            q, k, v = attention.project(layer.attention_input(self.embed_tokens(ids), features), cos, sin)
            keys.append(k)
            values.append(v)
            scores = (q @ keys[0].transpose(-1, -2)).float() * scale  # [B, nh, T, T]
            scores = scores.masked_fill(~visible[:, None], torch.finfo(torch.float32).min)
            own = [(q * key).sum(-1).float() * scale for key in keys[1:]]  # same position, steps 1..k
            weights = torch.softmax(torch.cat([scores, *[s[..., None] for s in own]], dim=-1), dim=-1).to(q.dtype)
            attended = weights[..., :time] @ values[0]
            for index, value in enumerate(values[1:]):
                attended = attended + weights[..., time + index, None] * value
            attended = attended.transpose(1, 2).reshape(batch, time, -1)
            features = layer.finish(features, attended)
            logits.append(self.logits(features))
        return torch.stack(logits, dim=1)
