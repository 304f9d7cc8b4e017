"""Resolve a TopContextsConfig into real inputs (SAE file, store or text + model, tokenizer, unembedding) and run
`compute_top_contexts`. This is what `scripts/top_contexts.py` calls."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llama.cli import UserError
from sae.analysis.sources import StoreSource, TextSource
from sae.analysis.top_contexts import TopContextsConfig, compute_top_contexts


def _device(cfg: TopContextsConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    return cfg.device


def load_tokenizer(model_dir: str) -> Any:
    import llama
    try:
        return llama.Tokenizer.from_file(model_dir)
    except (UserError, OSError, FileNotFoundError) as e:
        print(f"warning: no tokenizer in {model_dir} ({e}); contexts will show token ids")
        return None


def run_top_contexts(cfg: TopContextsConfig, model: Any = None, tokenizer: Any = None) -> Path:
    """`model` / `tokenizer`: already loaded ones of the model the config names (the demo's), else loaded here."""
    import llama
    import sae as sae_pkg
    if not cfg.sae:
        raise UserError("--sae is required (an SAE folder with cfg.json + sae_weights.safetensors)")
    if bool(cfg.store) == bool(cfg.text):
        raise UserError("give exactly one of --store (an activation store) or --text (a text file + --model)")
    if not Path(cfg.sae).is_dir():
        raise UserError(f"--sae {cfg.sae}: not a folder (expected cfg.json + sae_weights.safetensors)")
    device = _device(cfg)
    sae_model = sae_pkg.load(cfg.sae, device=device)
    hook = getattr(sae_model.cfg, "hook_name", "")
    store = None
    model_dir = str(llama.resolve_model(cfg.model)) if cfg.model else ""  # a path, or a name such as smollm2
    if cfg.store:
        from sae.activations.store import open_store
        store = open_store(cfg.store)
        model_dir = model_dir or str(store.manifest.get("model", ""))
        point = cfg.point or (hook if hook in getattr(store, "points", []) else None)
        if store.d_model != sae_model.cfg.d_in:
            raise UserError(f"--store {cfg.store} has d_model {store.d_model} but the SAE expects d_in "
                            f"{sae_model.cfg.d_in}")
    elif not model_dir:
        raise UserError("--text needs --model (the model folder to run the text through)")
    if tokenizer is None:
        tokenizer = load_tokenizer(model_dir) if model_dir and Path(model_dir).exists() else None
    if (cfg.text or cfg.logit_lens) and model is None:
        if not model_dir or not Path(model_dir).exists():
            if cfg.text:
                raise UserError(f"--model {model_dir!r}: model folder not found")
            print(f"warning: model folder {model_dir!r} not found; skipping promoted/suppressed tokens")
        else:
            model = llama.load_model(model_dir, device=device, dtype=torch.float32)
    if cfg.text:
        if tokenizer is None:
            raise UserError(f"--model {model_dir}: no tokenizer found, cannot tokenize --text")
        source: Any = TextSource(model, tokenizer, hook, cfg.text, cfg.max_len, max_rows=cfg.max_rows, device=device)
    else:
        source = StoreSource(store, cfg.batch_rows, point, cfg.max_rows, device=device)
    lm = (model.norm.weight.detach(), model.output.weight.detach()) if (model is not None and cfg.logit_lens) else None
    extra = {"hook_name": hook, "model": model_dir}
    return compute_top_contexts(source, sae_model, cfg.out, cfg, tokenizer, lm, extra)
