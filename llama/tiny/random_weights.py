"""Random-weight checkpoints at real shapes, streamed to disk (tests and benchmarks: no download, little RAM)."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch


def write_random_safetensors(file: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0, gain: float = 1.0) -> None:
    """Stream random bf16 tensors straight to a .safetensors file (8-byte header size, JSON header, raw data):
    nothing is held in memory. Values are slices of a small random bank at random offsets: matrices scaled by
    gain/sqrt(fan_in) (embeddings and lm_head by 1), norm gains ~U(0.5, 1.5), so activations stay O(1) through all
    layers. Seconds even at Llama-3.2-1B size on 2 cores."""
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(1 << 22, generator=gen)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    banks: dict[float, np.ndarray] = {}
    with open(file, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)) + head)
        for name, shape in shapes.items():
            scale = 0.0 if len(shape) == 1 else 1.0 if "embed" in name or "lm_head" in name else gain / shape[1] ** 0.5
            if scale not in banks:
                values = 1.0 + bank.clamp(-1, 1) / 2 if scale == 0.0 else bank * scale
                banks[scale] = values.bfloat16().view(torch.int16).numpy()
            values, n = banks[scale], math.prod(shape)
            half = len(values) // 2
            for start in range(0, n, half):
                at = int(torch.randint(0, half, (1,), generator=gen))
                fh.write(values[at:at + min(half, n - start)].tobytes())
