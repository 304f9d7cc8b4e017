"""Capture residual-stream activations of a Llama into an activation store, resumably, on one or N ranks.

    cfg = CaptureConfig(model="weights/tiny", inputs=["weights/tiny/heldout.txt"], out="out/activations/tiny")
    manifest = run_capture(cfg)

The pipeline on each rank: a loader thread reads and tokenizes documents and packs them into batches
(sae/activations/packing.py); the main thread runs the forward up to the deepest capture point only (stop_early) and keeps
the non-padding positions in bf16; a writer thread commits fixed-size shards behind a bounded queue
(sae/activations/store_writer.py). Rank 0 writes manifest.json once every rank is done.

Resume, exactly: the batch stream is a pure function of the inputs and the config, and shard k of a rank holds
rows [k*shard_rows, (k+1)*shard_rows) of that rank's row stream. A rerun reads which shards are committed, skips
every batch whose rows all lie before the first missing row (without running the model), recomputes the batch
that straddles it and drops the rows it already has. Shard statistics are exact and merged at the end, so the
finished store is the same, shard for shard, as an uninterrupted run. plan.json records what the store holds;
a rerun with another model, capture point or setting is refused (or wiped with --overwrite).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from llama.checkpoint import resolve_model
from llama.cli import UserError, atomic_write_json, progress_bar, save_config
from sae.activations import store_format as fmt
from sae.activations.inputs import count_documents, expand_inputs, file_fingerprint, iter_documents
from sae.activations.packing import Batch, PackSpec, plan_batches, prefetch
from sae.activations.store_writer import BackgroundWriter, ShardRows, ShardWriter, write_manifest

DEFAULT_MODEL = "weights/tiny"
C = TypeVar("C", bound="ContextConfig")


@dataclass
class ContextConfig:
    """Where the model's residual stream comes from: model, documents, contexts, forward batches, the held-out
    split. Shared by the capture job (CaptureConfig) and store-free SAE training (sae.multi.StreamTrainConfig)."""
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model folder (Meta or HF layout), .gguf file, or "
                                                                "a name: smollm2"})
    inputs: list[str] = field(default_factory=list, metadata={
        "help": ".txt/.jsonl/.parquet files, folders or globs (default: <model>/heldout.txt)"})
    points: list[str] = field(default_factory=list, metadata={
        "help": "capture points, e.g. blocks.10.hook_resid_post (default: resid_post at ~2/3 depth)"})
    mode: str = field(default="sentences", metadata={"choices": ["sentences", "windows"],
                                                    "help": "contexts: sentences or fixed token windows"})
    ctx_len: int = field(default=64, metadata={"help": "max tokens per context (window length), BOS included"})
    bos: bool = field(default=True, metadata={"help": "prepend BOS to every context"})
    keep_bos: bool = field(default=False, metadata={"help": "also keep the attention-sink rows (position 0 and "
                                                            "BOS/EOS tokens: outlier norms)"})
    min_pos: int = field(default=0, metadata={"help": "drop positions below this in each context too (0/1: only "
                                                      "position 0). 2 also drops position 1, which SmolLM2 turns "
                                                      "into a second attention sink (~150x the median norm from "
                                                      "layer ~10 on) when it holds a delimiter such as '.', '-', ':'"})
    txt_docs: str = field(default="lines", metadata={"choices": ["lines", "file"],
                                                    "help": ".txt: one document per line, or per file"})
    text_field: str = field(default="text", metadata={"help": ".jsonl/.parquet text field"})
    max_docs: int = field(default=0, metadata={"help": "stop after this many documents (0: all)"})
    batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per forward batch"})
    max_batch: int = field(default=256, metadata={"help": "max contexts per forward batch"})
    pack_contexts: int = field(default=8192, metadata={"help": "contexts sorted together by length (at most "
                                                               "2^20 tokens of them)"})
    prefetch: int = field(default=-1, metadata={"help": "batches tokenized ahead on a loader thread (-1: 4 on cuda "
                                                        "or when torch leaves a core free, else 0: it would contend)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1 ... (auto: cuda if available)"})
    dtype: str = field(default="auto", metadata={"choices": ["auto", "float32", "bfloat16", "float16"],
                                                "help": "model compute dtype (auto: bf16 on cuda, fp32 on cpu)"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of documents held out as the validation "
                                                                "split (SAE validation, evaluation FVU); 1: all of "
                                                                "them (a store of evaluation text)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@dataclass
class CaptureConfig(ContextConfig):
    out: str = field(default="", metadata={"help": "store folder (default: out/activations/<model name>)"})
    shard_rows: int = field(default=16384, metadata={"help": "rows per shard"})
    queue_size: int = field(default=8, metadata={"help": "batches the writer queue holds"})
    overwrite: bool = field(default=False, metadata={"help": "replace a store of another model/point/setting"})


# settings that change which rows (or which values) the store holds: a resume must match them all
ROW_SETTINGS = ("mode", "ctx_len", "bos", "keep_bos", "txt_docs", "text_field", "max_docs", "batch_tokens",
                "max_batch", "pack_contexts", "shard_rows", "dtype", "val_fraction", "min_pos")
DEFAULTS_OF_OLDER_STORES = {"val_fraction": 0.05, "min_pos": 0}  # settings that older stores implicitly had


def resolve_context(cfg: C) -> C:
    """Fill the context defaults that depend on other fields (model path, inputs, device, dtype, prefetch)."""
    model = resolve_model(cfg.model)  # a path (weights/tiny from any folder), or a name such as smollm2
    if not model.exists():
        hint = " (the embedded tiny model ships in weights/tiny)" if cfg.model == DEFAULT_MODEL else ""
        raise UserError(f"--model {cfg.model} does not exist{hint}")
    if not cfg.inputs and model.is_file():
        raise UserError(f"--inputs: give the text to capture (--model {cfg.model} is a file, with no heldout.txt)")
    inputs = list(cfg.inputs) or [str(model / "heldout.txt")]
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    for name in ("ctx_len", "batch_tokens", "max_batch", "pack_contexts"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.val_fraction <= 1.0:
        raise UserError(f"--val-fraction must be in [0, 1], got {cfg.val_fraction}")
    if not 0 <= cfg.min_pos < cfg.ctx_len:
        raise UserError(f"--min-pos must be in [0, --ctx-len {cfg.ctx_len}), got {cfg.min_pos}")
    if cfg.ctx_len < 2 and cfg.bos:
        raise UserError("--ctx-len must be at least 2 when a BOS is prepended")
    if cfg.batch_tokens < cfg.ctx_len:
        raise UserError(f"--batch-tokens ({cfg.batch_tokens}) must hold one context (--ctx-len {cfg.ctx_len})")
    spare_core = torch.get_num_threads() < (os.cpu_count() or 1)  # else a loader thread only contends with torch
    prefetch = cfg.prefetch if cfg.prefetch >= 0 else (4 if device.startswith("cuda") or spare_core else 0)
    return dataclasses.replace(cfg, model=str(model), inputs=inputs, device=device, dtype=dtype, prefetch=prefetch)


def resolve(cfg: CaptureConfig) -> CaptureConfig:
    """Fill the defaults that depend on other fields (inputs, out, device, dtype)."""
    cfg = resolve_context(cfg)
    for name in ("shard_rows", "queue_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    model = Path(cfg.model)
    out = cfg.out or str(Path("out") / "activations" / (model.stem if model.is_file() else model.resolve().name))
    return dataclasses.replace(cfg, out=out)


def load_model_and_tokenizer(cfg: ContextConfig, device: torch.device, model=None, tok=None) -> tuple:
    """The model (in cfg.dtype, eval mode) and tokenizer of a resolved config; given ones are used as they are."""
    if model is None or tok is None:
        import llama
        if tok is None:
            tok = llama.Tokenizer.from_file(cfg.model)
        if model is None:
            model = llama.load_model(cfg.model, device=device, dtype=getattr(torch, cfg.dtype))
    return model.eval(), tok


def resolve_points(points: list[str], model) -> list[str]:
    """The requested capture points, checked against the model (default: resid_post at ~2/3 depth)."""
    points = list(points) or [default_point(model.args.n_layers)]
    check_points(points, model)
    return points


def pack_spec(cfg: ContextConfig) -> PackSpec:
    return PackSpec(cfg.mode, cfg.ctx_len, cfg.bos, cfg.keep_bos, cfg.batch_tokens, cfg.max_batch, cfg.pack_contexts,
                    min_pos=cfg.min_pos)


def context_batches(cfg: ContextConfig, files: list[Path], tok, rank: int = 0, world: int = 1,
                    keep: Callable[[int], bool] | None = None, pack_tokens: int = 0,
                    shuffle: Sequence[int] | None = None) -> Iterator[Batch]:
    """The rank's packed batches of the inputs (documents i % world == rank, filtered by `keep(doc_id)`), tokenized
    ahead on a loader thread when cfg.prefetch > 0. pack_tokens > 0: length-sort at most that many tokens at once;
    shuffle: seed words of plan_batches' random batch order (None: capture's order)."""
    spec = pack_spec(cfg)
    spec = spec._replace(pack_tokens=pack_tokens) if pack_tokens else spec
    stream = plan_batches(iter_documents(files, cfg.txt_docs, cfg.text_field), tok, spec, rank, world,
                          cfg.max_docs, keep, shuffle)
    return prefetch(stream, cfg.prefetch) if cfg.prefetch else stream


def forward_rows(model, batch: Batch, points: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """One forward as deep as the deepest point: each point's activations at the batch's rows, [n_rows, d_model]
    in the model's dtype on `device`, in row order."""
    with torch.inference_mode():
        acts = model(batch.tokens.to(device), capture=points, stop_early=True).activations
        mask = batch.mask.to(device)
        return {p: acts[p][mask] for p in points}


def checkpoint_hash(folder: Path, extra: list[Path] = (), full_below: int = 64 << 20) -> str:
    """sha256 over the model files: names, sizes, and contents (first and last MiB of files above 64 MiB)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and (p.suffix in (".json", ".pth", ".safetensors",
                   ".model", ".bin") or p.name.startswith("tokenizer"))) if Path(folder).is_dir() else [Path(folder)]
    for p in [*files, *extra]:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}\n".encode())
        with open(p, "rb") as fh:
            if size <= full_below:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()


def default_point(n_layers: int) -> str:
    return f"blocks.{max(0, round(2 * n_layers / 3) - 1)}.hook_resid_post"


def check_points(points: list[str], model) -> None:
    valid = set(model.valid_points())
    for p in points:
        if p not in valid:
            n = model.args.n_layers
            raise UserError(f"unknown capture point {p!r}; valid points are blocks.<i>.<name> with i in 0..{n - 1} "
                            f"and name one of hook_resid_pre, hook_attn_out, hook_mlp_out, hook_resid_post "
                            f"(e.g. {default_point(n)})")
    if len(set(points)) != len(points):
        raise UserError(f"capture points repeat: {points}")


def _describe(plan: dict) -> str:
    return f"model {plan['model']} (checkpoint {plan['checkpoint_hash'][:12]}), points {plan['points']}"


def prepare_store(out: Path, plan: dict, overwrite: bool, is_writer: bool) -> str:
    """Decide what to do with the output folder: 'new', 'resume' or 'complete'. Refuses foreign stores."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    old = fmt.read_json(out / fmt.PLAN) if (out / fmt.PLAN).exists() else None
    if old is not None:
        old["config"] = {**DEFAULTS_OF_OLDER_STORES, **old.get("config", {})}
    if old is None and out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is a non-empty folder that is not an activation store; pick an empty or new "
                        f"folder (refusing to write into it even with --overwrite)")
    if old is not None and old != plan:
        if not overwrite:
            if (old.get("checkpoint_hash"), old.get("points")) != (plan["checkpoint_hash"], plan["points"]):
                raise UserError(f"--out {out} holds a store of {_describe(old)}, not of {_describe(plan)}; pass "
                                f"--overwrite to replace it or choose another --out")
            diff = [k for k in sorted(set(old) | set(plan)) if old.get(k) != plan.get(k)]
            cdiff = [f"{k}: {old['config'].get(k)!r} -> {plan['config'].get(k)!r}" for k in ROW_SETTINGS
                     if old.get("config", {}).get(k) != plan["config"].get(k)]
            raise UserError(f"--out {out} holds a store written with other settings ({'; '.join(cdiff) or diff}); "
                            f"rerun with the same settings to resume it, or pass --overwrite to replace it")
        if is_writer:
            for name in (fmt.MANIFEST, fmt.PLAN, fmt.CONFIG):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / fmt.SHARD_DIR, ignore_errors=True)
        old = None
    if old is None:
        return "new"
    return "complete" if (out / fmt.MANIFEST).exists() else "resume"


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def run_capture(cfg: CaptureConfig, model=None, tokenizer=None) -> dict:
    """Capture per `cfg` (model and tokenizer are loaded from cfg.model unless given). Returns the manifest."""
    cfg = resolve(cfg)
    rank, world, local_rank = _dist_env()
    dist = None
    device = torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" and world > 1 else cfg.device)
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():  # NCCL bound to this rank's GPU, so its barriers never guess the device
            if device.type == "cuda":
                torch.cuda.set_device(device)
                dist.init_process_group("nccl", device_id=device)
            else:
                dist.init_process_group("gloo")
    try:
        return _capture(cfg, model, tokenizer, rank, world, device, dist)
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def _capture(cfg: CaptureConfig, model, tok, rank: int, world: int, device: torch.device, dist) -> dict:
    files = expand_inputs(cfg.inputs)
    n_docs, skipped = count_documents(files, cfg.txt_docs, cfg.text_field)
    n_docs = min(n_docs, cfg.max_docs) if cfg.max_docs else n_docs
    model, tok = load_model_and_tokenizer(cfg, device, model, tok)
    points = resolve_points(cfg.points, model)
    out = Path(cfg.out)
    plan = {"format_version": fmt.FORMAT_VERSION, "model": str(Path(cfg.model).resolve()),
            "checkpoint_hash": checkpoint_hash(Path(cfg.model)), "points": points, "d_model": model.args.dim,
            "world_size": world, "sources": [file_fingerprint(f) for f in files],
            "config": {k: getattr(cfg, k) for k in ROW_SETTINGS}}
    state, error = None, None
    if rank == 0:  # rank 0 alone decides and writes the plan; the others learn the outcome (no half-made folder race)
        try:
            state = prepare_store(out, plan, cfg.overwrite, is_writer=True)
        except UserError as e:
            error = str(e)
        if error is None and state != "complete":
            (out / fmt.SHARD_DIR).mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / fmt.CONFIG)
            atomic_write_json(out / fmt.PLAN, plan)
    if dist is not None:
        box = [state, error]
        dist.broadcast_object_list(box, src=0)
        state, error = box
    if error is not None:
        raise UserError(error)
    if state == "complete":
        if rank == 0:
            print(f"{out} is already complete ({fmt.read_json(out / fmt.MANIFEST)['rows']} rows); nothing to do")
        return fmt.read_json(out / fmt.MANIFEST)

    done = fmt.committed_shards(out, rank)
    resume_row = sum(s["rows"] for s in done)
    (out / fmt.SHARD_DIR / f"r{rank}.done.json").unlink(missing_ok=True)
    for stray in [*(out / fmt.SHARD_DIR).glob(f".r{rank}_*.tmp"), *(out / fmt.SHARD_DIR).glob(f".r{rank}.*.tmp")]:
        stray.unlink(missing_ok=True)  # temp files of a killed run (never part of the store)
    writer = BackgroundWriter(ShardWriter(out, rank, points, model.args.dim, cfg.shard_rows, resume=done),
                              cfg.queue_size)
    my_docs = len(range(rank, n_docs, world))
    bar = progress_bar(total=my_docs, unit="doc", disable=not cfg.progress or rank != 0, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.0f}/{total} docs [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
               desc=f"capture {','.join(points)}" + (f" (rank 0 of {world})" if world > 1 else ""))
    t0, rows_new = time.perf_counter(), 0
    try:
        for batch in context_batches(cfg, files, tok, rank, world):
            end = batch.row_start + batch.n_rows
            if batch.n_rows and end > resume_row:
                drop = max(0, resume_row - batch.row_start)
                acts = forward_rows(model, batch, points, device)
                bits = {p: a[drop:].to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
                        for p, a in acts.items()}
                writer.put(ShardRows(bits, batch.token_id[drop:], batch.doc_id[drop:], batch.ctx[drop:],
                                     batch.pos[drop:]))
                rows_new += batch.n_rows - drop
            bar.update(batch.docs_done)  # a float share: the bar moves with every batch
            bar.set_postfix_str(f"{rows_new / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if dist is not None:
        dist.barrier()
    if rank != 0:
        return {}
    extra = {"documents": n_docs, "skipped": dict(skipped), "bos": cfg.bos, "keep_bos": cfg.keep_bos,
             "min_pos": cfg.min_pos,
             "val_fraction": cfg.val_fraction,
             "mode": cfg.mode, "ctx_len": cfg.ctx_len}
    manifest = write_manifest(out, plan, world, extra)
    print(f"wrote {manifest['rows']:,} rows x {len(points)} point(s) of d_model {model.args.dim} in "
          f"{len(manifest['shards'])} shard(s) to {out}" + (f"; skipped {dict(skipped)}" if skipped else ""))
    return manifest
