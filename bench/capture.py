"""Capture and store-read throughput, against peers measured in the same run (only same-run ratios mean anything).

    python bench/capture.py                      # dim 512, 8 layers, random weights, CPython-docs text, CPU
    python bench/capture.py --dim 2048 --n-layers 16 --device cuda --dtype bfloat16

Rows: the tokens that end up in the store (no BOS, no padding); every line counts the same rows of the same batches.
  forward(stop_early)  our model up to the capture point only: the forward a capture cannot avoid
  forward(full)        our model with logits, the plain forward
  capture              scripts/capture.py's loop end to end: read+split+tokenize+pack, forward, bf16, queue, write
                       shards + stats (model already loaded). Goal: <= 10% over forward(stop_early).
  HF hidden_states     transformers LlamaForCausalLM(output_hidden_states=True) on the same weights and batches,
                       rows gathered and cast to bf16 (what one would otherwise write), nothing written to disk
Store read: ActivationStore.batches (shuffled across shards; as bf16 and converted to fp32) in rows/s and GB/s of
bf16 read, of the captured store and of a synthetic Llama-width store, next to one TopK SAE training step
(16x latents, k=32) on the same rows: the reader must be far faster than training consumes.
On CUDA every timing ends with torch.cuda.synchronize (the device's work is counted, not just its queueing) and
each row reports the peak CUDA memory (torch.cuda.max_memory_allocated) of its runs.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import llama  # noqa: E402
from llama.cli import parse_config  # noqa: E402
from sae.activations.capture import CaptureConfig, default_point, run_capture  # noqa: E402
from sae.activations.inputs import iter_documents  # noqa: E402
from sae.activations.packing import PackSpec, plan_batches  # noqa: E402
from sae.activations.store import open_store  # noqa: E402


@dataclass
class BenchConfig:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    docs: int = 1200
    mode: str = field(default="sentences", metadata={"choices": ["sentences", "windows"]})
    ctx_len: int = 64
    batch_tokens: int = 8192
    repeats: int = 3
    device: str = "cpu"
    dtype: str = field(default="float32", metadata={"choices": ["float32", "bfloat16"]})  # model weights
    threads: int = 0  # 0: torch's default
    read_batch: int = 4096
    read_batches: int = 100
    read_d_model: int = 2048  # also read a synthetic store this wide (0: skip)
    read_rows: int = 65536
    sae_batch: int = 1024
    prefetch: int = -1  # capture's loader thread (-1: its default)
    queue_size: int = 8  # capture's writer queue


def corpus(n: int, folder: Path) -> tuple[Path, Path]:
    """CPython documentation text (ships with Python) and a SentencePiece tokenizer: the tiny model's, else trained."""
    from llama.tiny.corpus import build_corpus, train_sentencepiece
    docs = build_corpus().train[:n]
    text = folder / "docs.txt"
    text.write_text("\n".join(docs) + "\n")
    tiny = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "tokenizer.model"
    tok = folder / "tokenizer.model"
    tok.write_bytes(tiny.read_bytes() if tiny.exists() else train_sentencepiece(docs, 4096))
    return text, tok


def build_models(cfg: BenchConfig, folder: Path, tok_file: Path):
    from transformers import LlamaConfig, LlamaForCausalLM
    vocab = llama.Tokenizer.from_file(tok_file).n_words
    hf_cfg = LlamaConfig(vocab_size=vocab, hidden_size=cfg.dim, intermediate_size=int(8 * cfg.dim / 3 / 64 + 1) * 64,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=1e-5, rope_theta=500000.0,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(tok_file.read_bytes())
    ours = llama.load_model(folder, device=cfg.device, dtype=cfg.dtype)
    return hf.to(cfg.device, getattr(torch, cfg.dtype)), ours


def timed(fn) -> float:
    """Wall seconds of fn(); on CUDA the device's queued work is waited for on both ends."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def peak_cuda_mb(reset: bool = True) -> float:
    """torch.cuda.max_memory_allocated in MiB since the last reset (0 without CUDA)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return 0.0
    mb = torch.cuda.max_memory_allocated() / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return mb


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BenchConfig, argv, description=__doc__)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    text, tok_file = corpus(cfg.docs, tmp)
    hf, ours = build_models(cfg, tmp / "model", tok_file)
    tok = llama.Tokenizer.from_file(tok_file)
    point = default_point(cfg.n_layers)
    layer = int(point.split(".")[1])
    dflt = CaptureConfig()  # the capture's own packing defaults, so both sides see the same batches
    spec = PackSpec(cfg.mode, cfg.ctx_len, True, False, cfg.batch_tokens, dflt.max_batch, dflt.pack_contexts)
    batches = list(plan_batches(iter_documents([text]), tok, spec))
    rows = sum(b.n_rows for b in batches)
    padded = sum(b.tokens.numel() for b in batches)
    print(f"model dim {cfg.dim} x {cfg.n_layers} layers (random weights, vocab {tok.n_words}), point {point}, "
          f"device {cfg.device}, torch threads {torch.get_num_threads()}")
    print(f"{cfg.docs} documents -> {rows:,} rows in {len(batches)} batches ({cfg.mode}, ctx_len {cfg.ctx_len}); "
          f"padding {100 * (1 - (rows + sum(b.tokens.shape[0] for b in batches)) / padded):.1f}% of positions")

    with torch.inference_mode():  # sanity: HF hidden_states[layer+1] is our resid_post of block `layer`
        b = batches[0]
        ref = hf(b.tokens.to(cfg.device), output_hidden_states=True).hidden_states[layer + 1]
        got = ours(b.tokens.to(cfg.device), capture=[point], stop_early=True).activations[point]
        print(f"check: max |HF - ours| at {point} = {(ref - got).abs().max().item():.2e}")

    def forward(stop_early: bool) -> None:
        with torch.inference_mode():
            for b in batches:
                ours(b.tokens.to(cfg.device), capture=[point], stop_early=stop_early)

    def hf_hidden() -> None:
        with torch.inference_mode():
            for b in batches:
                am = b.mask.clone()
                am[:, 0] = True  # the BOS is attended to, just not stored
                hs = hf(b.tokens.to(cfg.device), attention_mask=am.to(cfg.device), output_hidden_states=True)
                hs.hidden_states[layer + 1][b.mask.to(cfg.device)].to(torch.bfloat16).cpu()

    def capture() -> None:
        run_capture(CaptureConfig(model=str(tmp / "model"), inputs=[str(text)], out=str(tmp / "store"),
                                  points=[point], mode=cfg.mode, ctx_len=cfg.ctx_len, batch_tokens=cfg.batch_tokens,
                                  device=cfg.device, dtype=cfg.dtype, overwrite=True, progress=False,
                                  prefetch=cfg.prefetch, queue_size=cfg.queue_size),
                    model=ours, tokenizer=tok)

    forward(True)  # warm-up
    runs: dict[str, list[float]] = {"forward(stop_early)": [], "forward(full)": [], "capture": [],
                                    "HF hidden_states": []}
    peaks = dict.fromkeys(runs, 0.0)
    fns = {"forward(stop_early)": lambda: forward(True), "forward(full)": lambda: forward(False),
           "capture": capture, "HF hidden_states": hf_hidden}
    for _ in range(cfg.repeats):  # interleaved A/B/C/D, medians
        (tmp / "store" / "manifest.json").unlink(missing_ok=True)
        import shutil
        shutil.rmtree(tmp / "store", ignore_errors=True)
        for name, fn in fns.items():
            peak_cuda_mb()
            runs[name].append(timed(fn))
            peaks[name] = max(peaks[name], peak_cuda_mb())
    base = statistics.median(runs["forward(stop_early)"])
    print(f"\n{'':22s} {'rows/s':>10s} {'time/forward(stop_early)':>26s} {'peak CUDA MB':>13s}   "
          f"(median of {cfg.repeats})")
    for name, ts in runs.items():
        t = statistics.median(ts)
        print(f"{name:22s} {rows / t:10,.0f} {t / base:25.3f}x {peaks[name]:13,.0f}")

    read_section(open_store(tmp / "store"), cfg, "the captured store")
    if cfg.read_d_model:
        read_section(synthetic_store(tmp / "synthetic", cfg.read_d_model, cfg.read_rows), cfg, "a synthetic store")


def synthetic_store(path: Path, d: int, n: int):
    """n random bf16 rows of width d (documents of 50 rows) written by the capture's own ShardWriter."""
    import numpy as np
    from sae.activations.store_writer import ShardRows, ShardWriter, write_manifest
    w, rng = ShardWriter(path, 0, ["x"], d, 16384), np.random.default_rng(0)
    for i in range(0, n, 8192):
        m = min(8192, n - i)
        w.add(ShardRows({"x": rng.integers(0, 1 << 14, size=(m, d), dtype=np.uint16)}, np.zeros(m, np.int32),
                        np.arange(i, i + m, dtype=np.int64) // 50, np.zeros(m, np.int32), np.zeros(m, np.int32)))
    w.flush()
    write_manifest(path, {"model": "synthetic", "checkpoint_hash": "0", "points": ["x"], "d_model": d, "sources": [],
                          "config": {}}, 1, {})
    return open_store(path)


def read_section(store, cfg: BenchConfig, what: str) -> None:
    store.rows(0, len(store))  # page cache warm, as during training
    n_read = min(cfg.read_batches, store.batches_per_epoch(cfg.read_batch))
    print(f"\nstore read, {what}: {len(store):,} rows x {store.d_model} in {len(store.shards)} shards "
          f"(page cache warm), batches of {cfg.read_batch}, shuffled across shards")
    for name, dtype in (("bf16", torch.bfloat16), ("-> fp32", torch.float32)):
        it = store.batches(cfg.read_batch, seed=0, dtype=dtype, device=cfg.device)
        next(it)
        t = timed(lambda: [next(it) for _ in range(n_read - 1)])
        rows = (n_read - 1) * cfg.read_batch
        print(f"  {name:8s} {rows / t:12,.0f} rows/s  {rows * store.d_model * 2 / t / 1e9:6.2f} GB/s of bf16 read")
    try:
        from sae import SAEConfig, build_sae
        sae = build_sae(SAEConfig(d_in=store.d_model, n_latents=16 * store.d_model, k=32), device=cfg.device)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        x = next(store.batches(cfg.sae_batch, seed=1, device=cfg.device))

        def step() -> None:
            out = sae(x)
            (out.fvu + out.auxk_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()
        ts = statistics.median(timed(step) for _ in range(3))
        print(f"  peer: one TopK SAE training step (16x latents, k=32, batch {cfg.sae_batch}) "
              f"{cfg.sae_batch / ts:10,.0f} rows/s")
    except Exception as e:  # the SAE peer is informative only
        print(f"  (SAE step peer skipped: {type(e).__name__}: {e})")

if __name__ == "__main__":
    main()
