"""Read a Llama 3.x checkpoint folder: detect its layout, parse its config, and stream its tensors by our names.

Meta layout: params.json + consolidated.00.pth (names are already ours; read with weights_only=True, mmap=True, so
a pickle can never run code and nothing is read before it is needed).
HF layout: config.json + model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json.
HF renames every tensor (HF_TO_META below) and stores the rows of wq/wk in "rotate-half" order; we undo that.
GGUF: a single .gguf file (llama.cpp), read by llama/gguf_file.py.
`llama.checkpoint.load_model` turns the stream into a model.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch

from llama.cli import UserError
from llama.config import PRESETS, ModelArgs

# HF name (layer index as {}) -> our (= Meta's) name. Every HF tensor must appear here.
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
IGNORED = re.compile(r"(.*rotary_emb\.inv_freq|rope\.freqs)$")  # RoPE tables some old files carry; we recompute
LLAMA_3_2_SHAPES = {(2048, 16), (3072, 28)}  # (dim, n_layers) of Llama 3.2 1B/3B: RoPE factor 32, not 8


class Tensors(NamedTuple):
    args: ModelArgs
    tensors: Iterator[tuple[str, torch.Tensor, Path]]  # (our name, tensor as stored, file it came from)
    config_file: Path  # params.json or config.json: named when the weights disagree with it


def read_checkpoint(folder: Path) -> Tensors:
    """Detect the layout of `folder` (or a GGUF file) -> its ModelArgs plus a lazy stream of (name, tensor, file)."""
    if not folder.exists():
        raise UserError(f"checkpoint folder {folder} does not exist")
    if folder.is_file() and (folder.suffix.lower() == ".gguf" or is_gguf(folder)):
        from llama.gguf_file import read_gguf  # a GGUF file (llama.cpp): detected by its magic bytes
        return read_gguf(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint path {folder} is a file but not a GGUF file; expected a .gguf file or a folder "
                        "with params.json + consolidated.00.pth (Meta) or config.json + model.safetensors (HF)")
    if (folder / "params.json").exists():
        return read_meta(folder)
    if (folder / "config.json").exists():
        return read_hf(folder)
    if (folder / "original" / "params.json").exists():  # HF hub download of a Meta repo without config.json
        return read_meta(folder / "original")
    raise UserError(f"{folder}: no params.json (Meta layout) or config.json (HF layout) found; expected "
                    "params.json + consolidated.00.pth or config.json + model.safetensors")


# ---------------------------------------------------------------------------------------------- Meta layout
def read_meta(folder: Path) -> Tensors:
    params_file = folder / "params.json"
    params = _read_json(params_file)
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise UserError(f"{folder}: params.json found but no consolidated.00.pth")
    if len(shards) > 1:
        raise UserError(f"{folder}: {len(shards)} model-parallel shards (consolidated.00.pth ... ) are not supported; "
                        "use a single-shard checkpoint (Llama 3.2 1B/3B, 3.1 8B) or an HF-layout folder")
    sd = _torch_load(shards[0])
    emb, out = sd.get("tok_embeddings.weight"), sd.get("output.weight")
    tied = out is None or (emb is not None and out.shape == emb.shape and torch.equal(out, emb))  # 3.2 stores a copy
    args = meta_args(params, params_file, tied=tied, embedding=emb)

    def tensors() -> Iterator[tuple[str, torch.Tensor, Path]]:
        for name, t in sd.items():
            if not IGNORED.match(name):
                yield name, t, shards[0]
    return Tensors(args, tensors(), params_file)


def meta_args(params: dict[str, Any], file: Path, tied: bool = False,
              embedding: torch.Tensor | None = None) -> ModelArgs:
    """params.json -> ModelArgs. Meta's file has no RoPE factor: 32 for Llama 3.2 shapes, else 8 (Llama 3.1), unless
    the file says `rope_factor`. Embeddings are tied when output.weight is absent or a copy of tok_embeddings."""
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise UserError(f"{file}: missing key {key!r} (expected Meta's params.json fields)")
    extra: dict[str, Any] = {}
    if "vocab_size" not in params and embedding is not None:
        extra["vocab_size"] = embedding.shape[0]
    if "rope_factor" not in params and params.get("use_scaled_rope"):
        extra["rope_factor"] = 32.0 if (params["dim"], params["n_layers"]) in LLAMA_3_2_SHAPES else 8.0
    if "tie_embeddings" not in params:
        extra["tie_embeddings"] = tied
    try:
        return ModelArgs.from_params(params, **extra)
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"{file}: {e}") from None


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle.UnpicklingError (code in the pickle), RuntimeError (not a torch zip file), ...
        text = str(e)
        if "Unsupported global" in text or "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise UserError(f"{file}: refused to load: the pickle references objects other than tensors{what}, which "
                            "could run code; only plain state dicts of tensors are accepted") from None
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise UserError(f"{file}: not a readable PyTorch checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"{file}: expected a dict of name -> tensor, got {type(sd).__name__}")
    return sd


# ------------------------------------------------------------------------------------------------ HF layout
def read_hf(folder: Path) -> Tensors:
    config_file = folder / "config.json"
    args = hf_args(_read_json(config_file), config_file)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: expected a 'weight_map' object (tensor name -> file)")
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("model-*-of-*.safetensors"))
    if not files:
        raise UserError(f"{folder}: config.json found but no model.safetensors (or sharded model-*-of-*.safetensors)")
    for f in files:
        if not f.exists():
            raise UserError(f"{index}: lists {f.name}, which does not exist")

    def tensors() -> Iterator[tuple[str, torch.Tensor, Path]]:
        for f in files:
            yield from _read_safetensors(f, args)
    return Tensors(args, tensors(), config_file)


def _read_safetensors(file: Path, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor, Path]]:
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                if IGNORED.match(hf_name):
                    continue
                name = hf_to_meta(hf_name, file)
                if name.endswith(("attention.wq.weight", "attention.wk.weight")):  # rewritten: read, don't map
                    heads = args.n_heads if ".wq." in name else args.n_kv_heads
                    t = unpermute_rotate_half(_read_private(file, hf_name), heads, name, file)
                else:
                    t = f.get_tensor(hf_name)  # a view of the memory-mapped file: no copy until converted
                yield name, t, file
    except UserError:
        raise
    except Exception as e:  # safetensors' own errors: bad header, truncated data, ...
        raise UserError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _read_private(file: Path, name: str) -> torch.Tensor:
    """One tensor read with plain file I/O into private memory, so that tensors we rewrite anyway (q, k) leave no
    pages of the mmapped file resident in the process (the mapping lives on for the tensors used as they are)."""
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    with open(file, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        info = json.loads(fh.read(n))[name]
        start, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=dtypes.get(info["dtype"], torch.uint8))
        if info["dtype"] not in dtypes or out.numel() * out.element_size() != end - start:
            raise UserError(f"{file}: tensor {name!r} has dtype {info['dtype']}; expected BF16, F16 or F32")
        fh.seek(8 + n + start)
        if fh.readinto(out.view(-1).view(torch.uint8).numpy()) != end - start:
            raise UserError(f"{file}: tensor {name!r} is truncated")
    return out


def hf_to_meta(hf_name: str, file: Path) -> str:
    """`model.layers.7.mlp.up_proj.weight` -> `layers.7.feed_forward.w3.weight`, via HF_TO_META."""
    layer = re.search(r"\.(\d+)\.", hf_name)
    key = hf_name.replace(layer.group(0), ".{}.", 1) if layer else hf_name
    if key not in HF_TO_META:
        raise UserError(f"{file}: unexpected tensor {hf_name!r} (no Llama weight of that name)")
    return HF_TO_META[key].format(layer.group(1)) if layer else HF_TO_META[key]


def unpermute_rotate_half(w: torch.Tensor, n_heads: int, name: str = "", file: Path | None = None) -> torch.Tensor:
    """HF stores each head's rows as [all even dims, all odd dims] (rotate-half RoPE); Meta interleaves them
    [d0, d1, d2, ...] (pairs rotate together). [H*Dh, D] -> per head (2, Dh/2) -> (Dh/2, 2) -> [H*Dh, D]."""
    rows, cols = w.shape
    if rows % (2 * n_heads):
        raise UserError(f"{file}: tensor {name!r} has {rows} rows, not a multiple of 2 x {n_heads} heads")
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_args(cfg: dict[str, Any], file: Path) -> ModelArgs:
    """config.json (LlamaConfig) -> ModelArgs, incl. llama3 RoPE scaling from `rope_scaling` or `rope_parameters`."""
    def need(key: str) -> Any:
        if key not in cfg:
            raise UserError(f"{file}: missing key {key!r} (expected a LlamaConfig config.json)")
        return cfg[key]
    if cfg.get("model_type", "llama") != "llama":
        raise UserError(f"{file}: model_type is {cfg['model_type']!r}; expected 'llama'")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise UserError(f"{file}: {key}={cfg[key]!r} is not supported (Llama 3 uses {ok!r})")
    dim, n_heads, n_layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise UserError(f"{file}: head_dim={cfg['head_dim']} != hidden_size / num_attention_heads is not supported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(f"{file}: RoPE type {rope_type!r} is not supported (expected 'llama3' or 'default')")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 500000.0))
    max_pos = cfg.get("max_position_embeddings", 8192)
    kw: dict[str, Any] = dict(dim=dim, n_layers=n_layers, n_heads=n_heads,
                              n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=need("vocab_size"),
                              norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(theta), max_seq_len=max_pos,
                              tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    if rope_type == "llama3":
        kw.update(use_scaled_rope=True, rope_factor=float(rope["factor"]),
                  rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                  rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                  rope_original_max_pos=int(rope.get("original_max_position_embeddings", max_pos)))
    kw.update(_ffn_rule(dim, need("intermediate_size"), file))
    try:
        return ModelArgs(**kw)
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"{file}: {e}") from None


def _ffn_rule(dim: int, hidden: int, file: Path) -> dict[str, Any]:
    """HF gives the FFN width; ModelArgs derives it Meta's way. Find (multiple_of, ffn_dim_multiplier) giving it:
    the presets' rules first (so a real Llama reads back as its preset), else an exact fallback."""
    base = int(2 * (4 * dim) / 3)
    rules = [(p().multiple_of, p().ffn_dim_multiplier) for p in PRESETS.values()] + [(256, None)]
    rules.append((hidden, hidden / base))  # rounds int(~hidden) up to the next multiple of hidden: hidden itself
    for multiple_of, mult in rules:
        args = ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=mult)
        if args.ffn_hidden_dim == hidden:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    raise UserError(f"{file}: intermediate_size={hidden} cannot be expressed with Meta's FFN rule for dim={dim}")


# -------------------------------------------------------------------------------------------------- helpers
def is_gguf(file: Path) -> bool:
    """A file that starts with GGUF's magic bytes (llama/gguf_file.py reads it)."""
    try:
        with open(file, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data
