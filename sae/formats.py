"""SAE files: our SAELens-compatible folder (save/load), EleutherAI sparsify's folders (load, load_many, export),
import of the earlier project's `.pth`.

SAELens folder = `cfg.json` + `sae_weights.safetensors` with W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in],
b_dec (+ `threshold` for JumpReLU). The dataset scalar s is FOLDED into the weights so any SAELens-style reader
sees raw activations in and out (`normalize_activations: "none"`); `cfg["llama_sae"]` records s and our config
so `load` unfolds it back to unit-norm decoder rows exactly (up to float rounding).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save as st_save

from llama.checkpoint import model_name
from llama.cli import UserError, atomic_write_bytes, atomic_write_json
from sae.config import SAEConfig
from sae.model import SAE

SAELENS_ARCH = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard"}


def _folded(sae: SAE) -> dict[str, torch.Tensor]:
    """Raw-space weights (scalar normalisation folded in), our [n, d] orientation."""
    s = float(sae.norm_scale) if sae.cfg.normalize == "scalar" else 1.0
    return {"W_enc": sae.W_enc.detach().float() * s, "b_enc": sae.b_enc.detach().float(),
            "W_dec": sae.W_dec.detach().float() / s, "b_dec": sae.b_dec.detach().float() / s}


def save(sae: SAE, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `out_dir/cfg.json` + `out_dir/sae_weights.safetensors` (atomically)."""
    out = Path(out_dir)
    c = sae.cfg
    w = _folded(sae)
    tensors = {"W_enc": w["W_enc"].T.contiguous(), "b_enc": w["b_enc"], "W_dec": w["W_dec"].contiguous(), "b_dec": w["b_dec"]}
    if c.architecture == "batchtopk":
        tensors["threshold"] = sae.threshold.detach().float().clone()
    name = model_name(c.model) if c.model else ""  # shareable; the local path stays in llama_sae.model
    cfg = {
        "architecture": SAELENS_ARCH[c.architecture], "d_in": c.d_in, "d_sae": c.n_latents, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if c.normalize == "token" else "none",
        "reshape_activations": "none", "hook_name": c.hook_name, "model_name": name,
        "metadata": {"model_name": name, "hook_name": c.hook_name, "hook_head_index": None, "prepend_bos": True},
        "llama_sae": {**c.__dict__, "norm_scale": float(sae.norm_scale), **(extra or {})},
    }
    if c.architecture == "topk":
        cfg["k"] = c.k
    atomic_write_bytes(out / "sae_weights.safetensors", st_save(tensors))
    atomic_write_json(out / "cfg.json", cfg)
    return out


def _read_cfg(path: Path) -> dict[str, Any]:
    if not (path / "cfg.json").is_file() or not (path / "sae_weights.safetensors").is_file():
        subs = sorted(q.name for q in path.iterdir() if _is_sae_dir(q)) if path.is_dir() else []
        hint = f" (it holds the SAE folders {subs[:6]}: load one of them, or all with sae.load_many)" if subs else ""
        raise UserError(f"{path}: expected an SAE folder with cfg.json and sae_weights.safetensors (ours, SAELens) "
                        f"or sae.safetensors (sparsify){hint}")
    try:
        return json.loads((path / "cfg.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'cfg.json'}: not valid JSON ({e})") from e


def load(path: str | Path, device: str | torch.device = "cpu", hook_name: str | None = None) -> SAE:
    """Read a SAELens-style folder (ours, or a plain SAELens topk/jumprelu/standard SAE) or an EleutherAI sparsify
    hookpoint folder (cfg.json + sae.safetensors) into an SAE. hook_name overrides the capture point it records."""
    path = Path(path)
    if (path / "sae.safetensors").is_file() and not (path / "sae_weights.safetensors").is_file():
        sae = load_sparsify(path)
    else:
        sae = _load_saelens(path)
    if hook_name is not None:
        sae.cfg.hook_name = hook_name
    return sae.to(device).eval()


def _is_sae_dir(p: Path) -> bool:
    return (p / "cfg.json").is_file() and any((p / f).is_file() for f in ("sae_weights.safetensors", "sae.safetensors"))


def load_many(path: str | Path, device: str | torch.device = "cpu") -> dict[str, SAE]:
    """Every SAE folder under `path` (itself included), keyed by its path relative to `path`: a sparsify run's
    hookpoint folders (`layers.10`, ...) or a store-free run's `<point>/<shape>/sae` folders."""
    root = Path(path)
    found = sorted({q.parent for q in root.rglob("cfg.json") if _is_sae_dir(q.parent)})
    if not found:
        raise UserError(f"{root}: no SAE folder (cfg.json + sae_weights.safetensors or sae.safetensors) below it")
    return {str(q.relative_to(root)) or ".": load(q, device) for q in found}


# sparsify names a hookpoint by the HF module whose OUTPUT it reads: the decoder layer (= the residual stream
# after it), its MLP or its attention (before the residual add), or the embedding (the stream entering layer 0).
SPARSIFY_HOOKS = ((r"(?:model\.)?layers\.(\d+)", "blocks.{}.hook_resid_post"),
                  (r"(?:model\.)?layers\.(\d+)\.mlp", "blocks.{}.hook_mlp_out"),
                  (r"(?:model\.)?layers\.(\d+)\.self_attn", "blocks.{}.hook_attn_out"),
                  (r"(?:model\.)?embed_tokens", "blocks.0.hook_resid_pre"))


def hook_from_sparsify(hookpoint: str) -> str:
    """sparsify hookpoint -> our capture point (`layers.10` -> `blocks.10.hook_resid_post`); others unchanged."""
    for pattern, ours in SPARSIFY_HOOKS:
        m = re.fullmatch(pattern, hookpoint)
        if m:
            return ours.format(*m.groups())
    return hookpoint


def sparsify_hookpoint(hook_name: str) -> str:
    """Our capture point -> the sparsify hookpoint folder name that reads the same tensor (inverse of
    hook_from_sparsify; blocks.N.hook_resid_pre is layer N-1's output)."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_pre|resid_post|mlp_out|attn_out)", hook_name)
    if not m:
        return hook_name
    i, kind = int(m.group(1)), m.group(2)
    if kind == "resid_pre":
        return "embed_tokens" if i == 0 else f"layers.{i - 1}"
    return f"layers.{i}" + {"resid_post": "", "mlp_out": ".mlp", "attn_out": ".self_attn"}[kind]


def load_sparsify(path: str | Path) -> SAE:
    """One sparsify hookpoint folder: cfg.json (SparseCoderConfig fields + d_in) and sae.safetensors
    (encoder.weight [n, d], encoder.bias [n], W_dec [n, d], b_dec [d]). Its encoder is TopK(ReLU(W (x - b_dec) +
    b)), its decoder sum_i a_i W_dec[i] + b_dec on raw activations: our topk SAE with normalize="none"."""
    path = Path(path)
    try:
        raw = json.loads((path / "cfg.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path / 'cfg.json'}: not a readable JSON config ({e})") from e
    unsupported = {k: raw[k] for k in ("transcode", "skip_connection", "embed_skip", "gram_lookup") if raw.get(k)}
    if raw.get("activation", "topk") != "topk":
        unsupported["activation"] = raw["activation"]
    if unsupported:
        raise UserError(f"{path}: this sparsify coder uses {unsupported}; only plain TopK autoencoders (no "
                        f"transcoder, skip connection or groupmax) are readable")
    t = load_file(str(path / "sae.safetensors"))
    need = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
    if any(k not in t for k in need):
        raise UserError(f"{path / 'sae.safetensors'}: expected tensors {need}, got {sorted(t)}")
    n, d = t["encoder.weight"].shape
    if "d_in" in raw and int(raw["d_in"]) != d or t["W_dec"].shape != (n, d) or t["b_dec"].shape != (d,) \
            or t["encoder.bias"].shape != (n,) or not 0 < int(raw.get("k", 0)) <= n:
        raise UserError(f"{path}: inconsistent sparsify coder (d_in={raw.get('d_in')}, k={raw.get('k')}, encoder "
                        f"{tuple(t['encoder.weight'].shape)}, W_dec {tuple(t['W_dec'].shape)})")
    sae = SAE(SAEConfig(d_in=d, n_latents=n, k=int(raw["k"]), architecture="topk", normalize="none",
                        hook_name=hook_from_sparsify(path.name)))
    with torch.no_grad():
        sae.W_enc.copy_(t["encoder.weight"].float())
        sae.b_enc.copy_(t["encoder.bias"].float())
        sae.W_dec.copy_(t["W_dec"].float())
        sae.b_dec.copy_(t["b_dec"].float())
    return sae.eval()


def _load_saelens(path: Path) -> SAE:
    raw = _read_cfg(path)
    t = load_file(str(path / "sae_weights.safetensors"))
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if key not in t:
            raise UserError(f"{path / 'sae_weights.safetensors'}: missing tensor {key!r} (has {sorted(t)})")
    ours = raw.get("llama_sae")
    meta = raw.get("metadata") or {}
    if ours is not None:
        cfg = SAEConfig.from_dict(ours)
        s = float(ours.get("norm_scale", 1.0)) if cfg.normalize == "scalar" else 1.0
    else:
        arch = {"topk": "topk", "jumprelu": "batchtopk", "standard": "relu"}.get(raw.get("architecture", "standard"))
        if arch is None:
            raise UserError(f"{path / 'cfg.json'}: unsupported architecture {raw.get('architecture')!r}")
        norm = {"none": "none", "layer_norm": "token"}.get(raw.get("normalize_activations", "none"))
        if norm is None:
            raise UserError(f"{path / 'cfg.json'}: unsupported normalize_activations {raw['normalize_activations']!r}")
        cfg = SAEConfig(d_in=int(raw["d_in"]), n_latents=int(raw["d_sae"]), k=int(raw.get("k", 1)), architecture=arch,
                        normalize=norm, hook_name=raw.get("hook_name") or meta.get("hook_name", ""),
                        model=raw.get("model_name") or meta.get("model_name", ""))
        s = 1.0
    if t["W_enc"].shape != (cfg.d_in, cfg.n_latents) or t["W_dec"].shape != (cfg.n_latents, cfg.d_in):
        raise UserError(f"{path}: W_enc {tuple(t['W_enc'].shape)} / W_dec {tuple(t['W_dec'].shape)} do not match "
                        f"d_in={cfg.d_in}, d_sae={cfg.n_latents}")
    sae = SAE(cfg, device="cpu")
    with torch.no_grad():
        W_enc = t["W_enc"].float().T
        b_enc = t["b_enc"].float()
        if ours is None and not raw.get("apply_b_dec_to_input", True):  # pre = W x + b: fold b_dec into b_enc
            b_enc = b_enc + W_enc @ t["b_dec"].float()
        sae.W_enc.copy_(W_enc / s)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(t["W_dec"].float() * s)
        sae.b_dec.copy_(t["b_dec"].float() * s)
        sae.norm_scale.fill_(s)
        if "threshold" in t:
            sae.threshold.copy_(t["threshold"].float())
    return sae


def export_sparsify(sae: SAE, out_dir: str | Path) -> Path:
    """EleutherAI sparsify layout: `cfg.json` + `sae.safetensors` (encoder.weight [n, d], encoder.bias, W_dec
    [n, d], b_dec), raw space (scale folded in; decoder rows then have norm 1/s, so normalize_decoder=false).
    Name the folder `sparsify_hookpoint(sae.cfg.hook_name)` (e.g. run/layers.10) so readers know the point."""
    if sae.cfg.architecture != "topk" or sae.cfg.normalize == "token":
        raise UserError("sparsify export needs a topk SAE without per-token normalisation "
                        f"(this one: {sae.cfg.architecture}, normalize={sae.cfg.normalize})")
    out = Path(out_dir)
    w = _folded(sae)
    tensors = {"encoder.weight": w["W_enc"].contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"].contiguous(),
               "b_dec": w["b_dec"]}
    c = sae.cfg
    atomic_write_bytes(out / "sae.safetensors", st_save(tensors))
    atomic_write_json(out / "cfg.json", {"activation": "topk", "expansion_factor": max(1, c.n_latents // c.d_in),
                                         "normalize_decoder": False, "num_latents": c.n_latents, "k": c.k,
                                         "multi_topk": False, "skip_connection": False, "transcode": False,
                                         "d_in": c.d_in})
    return out


def import_legacy_pth(path: str | Path, k: int, hook_name: str = "", model: str = "") -> SAE:
    """The earlier project's `.pth`: keys `b_pre` [d], `encoder.weight` [n, d], `encoder.bias` [n],
    `decoder.weight` [d, n] (nn.Linear(n, d)); inputs standardised per token with the BIASED std. Our per-token
    standardisation is SAELens' (unbiased std = c * biased std, c = sqrt(d / (d - 1))), so the constant c is
    folded in: W_enc * c, W_dec / c, b_pre / c compute the same pre-activations (hence the same TopK picks) and
    the same output, up to where the 1e-5 eps sits. Otherwise loaded as-is (its decoder was normalised along
    the wrong axis, so rows are NOT unit norm; TopK rankings forbid rescaling them away)."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UserError(f"{path}: cannot read as a torch state dict ({e})") from e
    for wrapper in ("state_dict", "model", "sae"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    need = ("b_pre", "encoder.weight", "encoder.bias", "decoder.weight")
    if not isinstance(sd, dict) or any(key not in sd for key in need):
        got = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
        raise UserError(f"{path}: expected keys {need}, got {got}")
    n, d = sd["encoder.weight"].shape
    if sd["decoder.weight"].shape != (d, n) or sd["b_pre"].shape != (d,) or sd["encoder.bias"].shape != (n,):
        raise UserError(f"{path}: inconsistent shapes for an SAE with d={d}, n={n}")
    sae = SAE(SAEConfig(d_in=d, n_latents=n, k=k, architecture="topk", normalize="token", hook_name=hook_name,
                        model=model))
    c = (d / (d - 1)) ** 0.5 if d > 1 else 1.0  # unbiased / biased std
    with torch.no_grad():
        sae.W_enc.copy_(sd["encoder.weight"].float() * c)
        sae.b_enc.copy_(sd["encoder.bias"].float())
        sae.W_dec.copy_(sd["decoder.weight"].float().T / c)
        sae.b_dec.copy_(sd["b_pre"].float() / c)
    return sae.eval()
