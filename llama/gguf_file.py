"""Read a GGUF file (llama.cpp's format) as a Llama checkpoint: hyperparameters from its `llama.*` keys, tensors
dequantized one at a time by the gguf package (ggml's own reader) and streamed under our (= Meta's) names.

    model = llama.load_model("SmolLM2-135M-Instruct.Q4_1.gguf")   # detected by its magic bytes, b"GGUF"

What a GGUF holds, and how it maps onto ModelArgs / our module names:
  - metadata keys `llama.block_count`, `embedding_length`, `feed_forward_length` (given explicitly, e.g. 1536 for
    SmolLM2), `attention.head_count`, `attention.head_count_kv`, `attention.layer_norm_rms_epsilon`,
    `rope.freq_base`, `context_length`; the vocabulary size is the row count of `token_embd`.
  - tensors `token_embd`, `blk.N.attn_q|attn_k|attn_v|attn_output`, `blk.N.ffn_gate|ffn_up|ffn_down`,
    `blk.N.attn_norm|ffn_norm`, `output_norm`, `output` (absent: tied embeddings). GGUF lists dimensions
    innermost first, so [in, out] in the file is our [out, in].
  - q and k rows: llama.cpp's converter permutes HF's rotate-half rows back into Meta's interleaved order (its
    `permute`, the inverse of HF's), and llama.cpp rotates adjacent pairs as Meta does. So they load as they are;
    transformers' GGUF loader is the one that undoes the permutation (tests/test_gguf.py checks both ways).
  - Llama 3.1/3.2 carry their llama3 RoPE scaling only as the `rope_freqs` tensor: one divisor per rotation pair.
    We read it back as ModelArgs' llama3 fields (factor = the largest divisor, the blend fitted) and check that
    our rope_frequencies reproduce base / divisor; a table that follows no llama3 rule is refused.
Peak memory: the model at the wanted dtype plus one tensor's dequantization at a time (the file is memory-mapped).
"""
from __future__ import annotations

import dataclasses
import math
import mmap
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from llama.checkpoint_files import Tensors, _ffn_rule, is_gguf
from llama.cli import UserError
from llama.config import ModelArgs
from llama.rope import rope_frequencies

GGUF_TO_META = {  # GGUF name (layer index as {}) -> our (= Meta's) name
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
META_TO_GGUF = {v: k for k, v in GGUF_TO_META.items()}
ROPE_FREQS = "rope_freqs.weight"
_REQUIRED = object()
CHUNK_VALUES = 1 << 22  # values dequantized per step (16 MiB of fp32 scratch)


def read_gguf(file: Path) -> Tensors:
    """ModelArgs from the metadata plus a lazy stream of (our name, dequantized fp32 tensor, file). Every tensor's
    name, shape and type is checked before the first one is dequantized."""
    reader = open_gguf(file)
    tensors = {t.name: t for t in reader.tensors}
    args = gguf_args(reader, tensors, file)
    reader.fields.clear()  # the metadata (~100k tokenizer strings as numpy views, ~150 MB) is read: let it go
    plan = _plan(tensors, args, file)

    def stream() -> Iterator[tuple[str, torch.Tensor, Path]]:
        for name, t in plan:
            w = dequantize(t, file)
            release(reader, t)
            yield name, w, file
    return Tensors(args, stream(), file)


def open_gguf(file: Path) -> Any:
    """gguf.GGUFReader over `file`, every failure turned into one UserError naming the file."""
    if not is_gguf(file):
        raise UserError(f"{file}: not a GGUF file (it does not start with the magic bytes b'GGUF')")
    from gguf import GGUFReader
    try:
        reader = GGUFReader(file)
    except Exception as e:  # noqa: BLE001  (the reader raises ValueError, IndexError, ... on a cut or bad file)
        raise UserError(f"{file}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None
    if reader.byte_order != "I":
        raise UserError(f"{file}: a GGUF of the other byte order (big-endian) is not supported")
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > file.stat().st_size:
        raise UserError(f"{file}: truncated: tensor data ends at byte {end} but the file has {file.stat().st_size}")
    return reader


def metadata(reader: Any, key: str, file: Path, default: Any = _REQUIRED) -> Any:
    """The value of metadata `key` (a str, int, float, bool or list), or `default`; missing and required: an error."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise UserError(f"{file}: metadata key {key!r} is missing (a llama GGUF from llama.cpp's converter has it)")
        return default
    return field.contents()


def gguf_args(reader: Any, tensors: dict[str, Any], file: Path) -> ModelArgs:
    """The `llama.*` metadata (and the embedding's row count, and `rope_freqs`) -> ModelArgs."""
    arch = metadata(reader, "general.architecture", file)
    if arch != "llama":
        raise UserError(f"{file}: architecture {arch!r} is not supported; expected 'llama' (Llama 2/3.x, SmolLM2, "
                        "Mistral 7B and other Llama-architecture models)")

    def key(name: str, default: Any = _REQUIRED) -> Any:
        value = metadata(reader, f"llama.{name}", file, default)
        if isinstance(value, list):
            raise UserError(f"{file}: llama.{name} varies per layer ({value[:4]}...), which Llama does not")
        return value
    if int(key("expert_count", 0)) > 0:
        raise UserError(f"{file}: a mixture of experts (llama.expert_count = {key('expert_count')}) is not supported")
    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    if "token_embd.weight" not in tensors:
        raise UserError(f"{file}: tensor 'token_embd.weight' is missing")
    vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF dims are innermost first: [dim, vocab]
    if int(key("vocab_size", vocab)) != vocab:
        raise UserError(f"{file}: llama.vocab_size = {key('vocab_size')} but token_embd.weight has {vocab} rows")
    kw: dict[str, Any] = dict(dim=dim, n_layers=int(key("block_count")), n_heads=n_heads,
                              n_kv_heads=int(key("attention.head_count_kv", n_heads)), vocab_size=vocab,
                              norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
                              rope_theta=float(key("rope.freq_base", 10000.0)),  # llama.cpp's default
                              max_seq_len=int(key("context_length", 8192)),
                              tie_embeddings="output.weight" not in tensors)
    kw.update(_ffn_rule(dim, int(key("feed_forward_length")), file))
    try:
        args = ModelArgs(**kw)
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"{file}: {e}") from None
    for name in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if int(key(name, args.head_dim)) != args.head_dim:
            raise UserError(f"{file}: llama.{name} = {key(name)} differs from the head dim {args.head_dim} "
                            "(embedding_length / head_count), which is not supported")
    scaling, factor = key("rope.scaling.type", "none"), float(key("rope.scaling.factor", 1.0))
    if scaling not in ("none", "") and not (scaling == "linear" and factor == 1.0):
        raise UserError(f"{file}: RoPE scaling {scaling!r} (factor {factor}) is not supported (Llama 3.x GGUFs "
                        "carry theirs as the rope_freqs tensor)")
    if ROPE_FREQS in tensors:
        divisors = dequantize(tensors[ROPE_FREQS], file).double()
        if tuple(divisors.shape) != (args.head_dim // 2,):
            raise UserError(f"{file}: tensor {ROPE_FREQS!r} has shape {list(divisors.shape)}, expected "
                            f"[{args.head_dim // 2}] (one divisor per rotation pair)")
        args = fit_llama3_rope(args, divisors, int(key("rope.scaling.original_context_length", 8192)), file)
    return args


def fit_llama3_rope(args: ModelArgs, divisors: torch.Tensor, original: int, file: Path) -> ModelArgs:
    """ModelArgs with llama3 RoPE scaling whose frequencies are base / divisors (llama.cpp's `rope_freqs`).

    The rule: pairs of short wavelength keep their frequency (divisor 1), long ones are divided by `factor`, and in
    between 1/divisor blends linearly with smooth = (original/wavelength - lo) / (hi - lo). Only the line
    smooth(freq) matters, so with the original length fixed, lo and hi are fitted to the blended pairs; Meta's
    values (1, 4, 8192) are tried first so a real Llama 3.x reads back exactly."""
    if bool((divisors == 1).all()):
        return args  # no scaling
    base = rope_frequencies(args).double()
    factor = float(divisors.max())
    fits = [dict(rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)]
    smooth = (1 / divisors - 1 / factor) / (1 - 1 / factor)  # 0 where divided by factor, 1 where kept
    blend = (smooth > 1e-6) & (smooth < 1 - 1e-6)
    if int(blend.sum()) >= 2:  # smooth = (x - lo) / (hi - lo), x = original / wavelength: a line in x
        x = original * base[blend] / (2 * math.pi)
        slope, intercept = np.polyfit(x.numpy(), smooth[blend].numpy(), 1)
        lo, hi = -intercept / slope, (1 - intercept) / slope
        fits.append(dict(rope_low_freq_factor=float(lo), rope_high_freq_factor=float(hi)))
    worst = math.inf
    for fit in fits:
        try:
            scaled = dataclasses.replace(args, use_scaled_rope=True, rope_factor=factor, rope_original_max_pos=original,
                                         **fit)
        except UserError:
            continue
        error = float(((rope_frequencies(scaled).double() - base / divisors).abs() / (base / divisors)).max())
        if error < 1e-4:  # float32 rounding of the file's table and of ours
            return scaled
        worst = min(worst, error)
    raise UserError(f"{file}: tensor {ROPE_FREQS!r} does not follow Llama 3's RoPE scaling rule (factor {factor:g}; "
                    f"the closest fit is off by {worst:.1e} relative); this RoPE variant is not supported")


def gguf_to_meta(name: str, file: Path) -> str:
    """`blk.7.ffn_up.weight` -> `layers.7.feed_forward.w3.weight`, via GGUF_TO_META."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    key = f"blk.{{}}.{m.group(2)}" if m else name
    if key not in GGUF_TO_META:
        raise UserError(f"{file}: unexpected tensor {name!r} (no Llama weight of that name; biases, experts and "
                        "other architectures' tensors are not supported)")
    return GGUF_TO_META[key].format(m.group(1)) if m else GGUF_TO_META[key]


def meta_to_gguf(name: str) -> str:
    """`layers.7.feed_forward.w3.weight` -> `blk.7.ffn_up.weight` (for messages naming what a file lacks)."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    return META_TO_GGUF[f"layers.{{}}.{m.group(2)}"].format(m.group(1)) if m else META_TO_GGUF[name]


def _plan(tensors: dict[str, Any], args: ModelArgs, file: Path) -> list[tuple[str, Any]]:
    """(our name, GGUF tensor) for every weight, after checking names, shapes against the metadata, and types."""
    from llama.checkpoint import meta_transformer
    expected = {k: tuple(v.shape) for k, v in meta_transformer(args).state_dict().items()}
    if args.tie_embeddings:
        del expected["output.weight"]  # the same Parameter as tok_embeddings
    plan, dequantizable = [], _dequantizable_types()
    for gguf_name, t in tensors.items():
        if gguf_name == ROPE_FREQS:
            continue
        name = gguf_to_meta(gguf_name, file)
        if name not in expected:
            raise UserError(f"{file}: unexpected tensor {gguf_name!r}: the metadata says llama.block_count = "
                            f"{args.n_layers}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != expected[name]:
            raise UserError(f"{file}: tensor {gguf_name!r} has shape {list(shape)} but the metadata (llama.* keys) "
                            f"implies {list(expected[name])}")
        if not dequantizable(t.tensor_type):
            from importlib.metadata import version
            raise UserError(f"{file}: tensor {gguf_name!r} has type {t.tensor_type.name}, which the installed gguf "
                            f"package ({version('gguf')}) cannot dequantize")
        plan.append((name, t))
    found = {name for name, _ in plan}
    missing = [meta_to_gguf(k) for k in expected if k not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{file}: tensor(s) {', '.join(missing[:3])}{more} missing")
    return plan


def _dequantizable_types() -> Any:
    """type -> bool, probing gguf.quants.dequantize once per type on one zero block (its public API has no list)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize as deq
    known: dict[Any, bool] = {GGMLQuantizationType.F32: True, GGMLQuantizationType.F16: True}

    def ok(qtype: Any) -> bool:
        if qtype not in known:
            try:
                deq(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)  # one block of zero bytes
                known[qtype] = True
            except NotImplementedError:
                known[qtype] = False
        return known[qtype]
    return ok


def dequantize(t: Any, file: Path) -> torch.Tensor:
    """One GGUF tensor -> a contiguous fp32 torch tensor [rows, cols] in private memory (never a view of the file),
    dequantized a block of rows at a time so the scratch space stays small whatever the tensor's size."""
    from gguf import dequantize as deq
    shape = [int(d) for d in reversed(t.shape.tolist())]
    out = torch.empty(shape, dtype=torch.float32)
    src = t.data.reshape(shape[0] if len(shape) > 1 else 1, -1)  # rows of blocks (bytes) or of values
    dst = out.view(src.shape[0], -1).numpy()
    step = max(1, CHUNK_VALUES // dst.shape[1])
    try:
        for i in range(0, src.shape[0], step):
            dst[i:i + step] = deq(src[i:i + step], t.tensor_type)
    except Exception as e:  # noqa: BLE001  (types were checked; this is a corrupt block)
        raise UserError(f"{file}: tensor {t.name!r} ({t.tensor_type.name}) could not be dequantized "
                        f"({type(e).__name__}: {e})") from None
    return out


def release(reader: Any, t: Any) -> None:
    """Drop the file pages of a tensor already dequantized from this process's memory (the OS page cache keeps
    them), so the mapped file does not add its size to the peak: a 4.5 GB Q4 file would otherwise stay resident."""
    mm = getattr(reader.data, "_mmap", None)  # numpy.memmap's mmap object
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = t.data_offset - t.data_offset % mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)
    except (OSError, ValueError):
        pass
