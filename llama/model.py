"""Llama 3.x, from scratch, readable top to bottom.

    tokens -> tok_embeddings -> n_layers x Block -> norm -> output -> logits

Each Block adds two things to the residual stream h:
    h = h + Attention(RMSNorm(h))      # tokens look at earlier tokens (GQA + RoPE)
    h = h + FeedForward(RMSNorm(h))    # each token is transformed on its own (SwiGLU)

The residual stream can be read (`capture`) and rewritten (`edit`) at named points, TransformerLens spelling:
    blocks.{i}.hook_resid_pre   h entering block i
    blocks.{i}.hook_attn_out    what attention adds to h
    blocks.{i}.hook_mlp_out     what the feed-forward adds to h
    blocks.{i}.hook_resid_post  h leaving block i

Shapes: B batch, T new tokens, S cached positions, D model dim, H query heads, KV key/value heads,
Dh head dim, N vocabulary. Module names are Meta's, so a Meta checkpoint loads with no renaming.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llama.cli import UserError
from llama.config import ModelArgs
from llama.cpu import causal_attention  # the one CPU fast path (llama/cpu/)
from llama.rope import apply_rope, rope_tables

Hook = Callable[[str, torch.Tensor], torch.Tensor]  # (point name within a block, tensor) -> tensor
POINTS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")


class ForwardOutput(NamedTuple):
    logits: torch.Tensor | None  # [B, T, N], None when stop_early skipped the unembedding
    activations: dict[str, torch.Tensor]  # capture-point name -> [B, T, D]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache(nn.Module):
    """Static cache of keys and values for every position seen so far: decode then costs O(S), not O(S^2)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, like: torch.Tensor) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=like.dtype, device=like.device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=like.dtype, device=like.device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, KV, T, Dh] at [start_pos, start_pos+T); return all keys/values so far [B, KV, S, Dh]."""
        B, _, T, _ = k.shape
        if start_pos + T > self.k.shape[2] or B > self.k.shape[0]:
            raise UserError(f"KV cache holds {self.k.shape[0]} x {self.k.shape[2]} positions; "
                            f"asked for {B} x {start_pos + T} (call setup_caches with larger sizes)")
        self.k[:B, :, start_pos:start_pos + T] = k
        self.v[:B, :, start_pos:start_pos + T] = v
        return self.k[:B, :, :start_pos + T], self.v[:B, :, :start_pos + T]


class Attention(nn.Module):
    """Causal multi-head attention; KV heads shared by groups of H/KV query heads (GQA)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
                last_only: bool = False) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); with last_only, keys/values for all T but the query (and output) of the last
        position only: (B, 1, D). That is all the final layer of a prompt needs for the next token."""
        B, T, _ = x.shape
        xq, cq, sq = (x[:, -1:], cos[-1:], sin[-1:]) if last_only else (x, cos, sin)
        Tq = xq.shape[1]
        q = self.wq(xq).view(B, Tq, self.n_heads, self.head_dim)  # (B, Tq, D) -> (B, Tq, H, Dh)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, D) -> (B, T, KV, Dh)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, D) -> (B, T, KV, Dh)
        q, k = apply_rope(q, cq, sq), apply_rope(k, cos, sin)  # position enters as a rotation of q and k
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, heads, Dh) -> (B, heads, T, Dh)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, KV, S, Dh) with S = start_pos + T
        S = k.shape[2]
        # softmax(q k^T / sqrt(Dh) + causal mask) v, each KV head serving H/KV query heads -> (B, H, Tq, Dh)
        if Tq > 1 and x.is_cpu and not torch.is_grad_enabled():  # a CPU prompt: grouped heads, block-causal bmm
            y = causal_attention(q, k, v)
        else:
            if Tq == 1:  # one query, at the newest position: it may see every key
                mask, causal = None, False
            elif S == Tq:  # no earlier positions: plain causal mask
                mask, causal = None, True
            else:  # query t sits at position S - Tq + t and may see keys 0..S - Tq + t
                mask = torch.ones(Tq, S, dtype=torch.bool, device=x.device).tril(diagonal=S - Tq)
                causal = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2).reshape(B, Tq, self.n_heads * self.head_dim)  # (B, H, Tq, Dh) -> (B, Tq, H*Dh)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, hidden, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """One transformer layer: pre-norm attention then pre-norm feed-forward, each added to the residual."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
                hook: Hook | None = None, last_only: bool = False) -> torch.Tensor:
        """h (B, T, D) -> (B, T, D), or (B, 1, D) for the last position only (the final layer of a prompt)."""
        point = hook or (lambda name, t: t)  # no capture/edit: every point is the identity
        h = point("hook_resid_pre", h)
        a = point("hook_attn_out", self.attention(self.attention_norm(h), start_pos, cos, sin, last_only))
        h = (h[:, -1:] if last_only else h) + a  # (B, T, D) -> (B, 1, D) when last_only
        h = h + point("hook_mlp_out", self.feed_forward(self.ffn_norm(h)))
        return point("hook_resid_post", h)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one Parameter, two uses

    def valid_points(self) -> list[str]:
        return [f"blocks.{i}.{p}" for i in range(self.args.n_layers) for p in POINTS]

    def _layer_of(self, name: str) -> int:
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in POINTS \
                or int(parts[1]) >= self.args.n_layers:
            raise UserError(f"unknown capture point {name!r}; valid points are blocks.{{0..{self.args.n_layers - 1}}}"
                            f".{{{','.join(POINTS)}}}, e.g. blocks.0.hook_resid_post")
        return int(parts[1])

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        like = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(max_batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim, like)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @staticmethod
    def _hook(i: int, capture: tuple[str, ...], edit: dict, activations: dict[str, torch.Tensor]) -> Hook:
        """The point function of block i: apply the edit (if any), then record the result (if captured)."""
        def point(name: str, x: torch.Tensor) -> torch.Tensor:
            name = f"blocks.{i}.{name}"
            if name in edit:
                x = edit[name](x)
            if name in capture:
                activations[name] = x
            return x
        return point

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, *, capture: Iterable[str] = (),
                edit: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                stop_early: bool = False, last_only: bool = False) -> ForwardOutput:
        """tokens [B, T] at positions [start_pos, start_pos+T) -> logits [B, T, N] (or [B, 1, N] if last_only).

        capture: names whose tensors are returned in `activations` (the value after any edit).
        edit: name -> fn(tensor) -> tensor, used in place of that point (steering, SAE splicing).
        stop_early: run only as deep as the deepest captured point and skip the unembedding (logits=None)."""
        capture, edit = tuple(capture), dict(edit or {})
        wanted = {name: self._layer_of(name) for name in (*capture, *edit)}
        last_layer = max((wanted[n] for n in capture), default=self.args.n_layers - 1) if stop_early \
            else self.args.n_layers - 1
        activations: dict[str, torch.Tensor] = {}

        B, T = tokens.shape
        h = self.tok_embeddings(tokens)  # (B, T) -> (B, T, D)
        cos, sin = rope_tables(self.args, start_pos, T, h.device)  # two (T, Dh/2) fp32 tables
        for i, layer in enumerate(self.layers[:last_layer + 1]):
            hook = self._hook(i, capture, edit, activations) if i in wanted.values() else None
            # the final layer's queries and feed-forward only matter at the last position when that is all we return
            last = last_only and not stop_early and hook is None and i == self.args.n_layers - 1
            h = layer(h, start_pos, cos, sin, hook, last)  # (B, T, D) -> (B, T, D): one more layer of the stream
        if stop_early:
            return ForwardOutput(None, activations)
        if last_only:
            h = h[:, -1:]  # (B, T, D) -> (B, 1, D): generation only needs the next-token logits
        return ForwardOutput(self.output(self.norm(h)), activations)  # (B, T, D) -> (B, T, N)
