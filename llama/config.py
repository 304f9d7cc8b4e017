"""ModelArgs: Llama 3.x hyperparameters, named exactly as in Meta's params.json, plus explicit RoPE scaling fields."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llama.cli import UserError


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None -> n_heads (no GQA)
    vocab_size: int = 128256
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    # llama3 RoPE frequency scaling (not in Meta's params.json; HF's config.json carries them in `rope_scaling`)
    rope_factor: float = 8.0  # 32 for Llama 3.2 1B/3B, 8 for Llama 3.1
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    max_seq_len: int = 8192  # longest sequence the KV cache is sized for by default
    tie_embeddings: bool = False  # output.weight is tok_embeddings.weight (Llama 3.2 1B/3B)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"ModelArgs.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise UserError(f"ModelArgs: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"ModelArgs: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise UserError(f"ModelArgs: head_dim={self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to a multiple of multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> "ModelArgs":
        """Build from a params.json dict; unknown keys (e.g. Meta's max_batch_size) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in {**params, **overrides}.items() if k in names}
        return cls(**kw)

    def to_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Presets: the published shapes. Parameter counts are checked against the published ones in the tests.
    @classmethod
    def llama_3_2_1b(cls) -> "ModelArgs":
        return cls(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256,
                   use_scaled_rope=True, rope_factor=32.0, max_seq_len=131072, tie_embeddings=True)

    @classmethod
    def llama_3_2_3b(cls) -> "ModelArgs":
        return cls(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0, multiple_of=256,
                   use_scaled_rope=True, rope_factor=32.0, max_seq_len=131072, tie_embeddings=True)

    @classmethod
    def llama_3_1_8b(cls) -> "ModelArgs":
        return cls(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
                   use_scaled_rope=True, rope_factor=8.0, max_seq_len=131072, tie_embeddings=False)


PRESETS = {
    "llama-3.2-1b": ModelArgs.llama_3_2_1b,
    "llama-3.2-3b": ModelArgs.llama_3_2_3b,
    "llama-3.1-8b": ModelArgs.llama_3_1_8b,
}
