"""Store-free SAE training vs capture-then-train, on the tiny model (same tokens, same run; only ratios mean anything).

    python bench/stream_train.py                       # speed + quality, ~3 min on 2 shared CPU cores
    python bench/stream_train.py --seeds 0             # speed only
    python bench/stream_train.py --model smollm2 --point blocks.15.hook_resid_post --corpus-docs 300 \
        --batch-size 512 --batch-tokens 2048 --rounds 1 --seeds     # SmolLM2-135M (GGUF), speed only, ~10 min
    python bench/stream_train.py --model M --inputs data.jsonl --point blocks.15.hook_resid_post --device cuda

Inputs: --corpus-docs documents of the tiny model's own training corpus (CPython docs), unless --inputs.
Speed (one point, one TopK SAE, the same N x B tokens: whole shuffle rounds within one pass over the inputs):
  capture+train  scripts/capture.py's job into a temp store, then the store path's Trainer for N steps
  store-free     sae.train_many: the same contexts forwarded on the fly into the shuffle buffer, same N steps
  forward share  seconds in the model's forward / wall seconds of the store-free run
  N SAEs         store-free wall time with 2 and 4 SAEs (k = 16, 32, 8, 24) on the point, relative to 1 SAE
                 (the goal, 4 SAEs < 2x one, needs the forward to dominate; on the tiny model it may not)
Quality (--seeds): two points trained in ONE store-free run vs the store path (one run per point) with the same
steps, shapes and seed; both evaluated by sae.evaluate.activation_metrics on the store's held-out split (the same
documents the store-free run held out). Printed per point: mean and spread over seeds, and the paired difference,
for each --buffer-batches (the store shuffles all rows; the stream mixes within a buffer of that many batches).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import llama  # noqa: E402
from llama.checkpoint import resolve_model  # noqa: E402
from llama.cli import parse_config  # noqa: E402
from sae.activations.capture import CaptureConfig, run_capture  # noqa: E402
from sae import load  # noqa: E402
from sae.activations.store import open_store  # noqa: E402
from sae.config import TrainConfig  # noqa: E402
from sae.evaluate import activation_metrics  # noqa: E402
from sae.multi import StreamTrainConfig  # noqa: E402
from sae.train import train  # noqa: E402
from sae.train_many import train_many  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchConfig:
    model: str = str(ROOT / "weights" / "tiny")
    inputs: list[str] = field(default_factory=list)  # default: <model>/heldout.txt
    point: str = "blocks.2.hook_resid_post"
    point2: str = "blocks.1.hook_resid_post"  # the second point of the quality comparison
    expansion: int = 8
    k: int = 16
    batch_size: int = 1024
    corpus_docs: int = 2500  # inputs: this many documents of the tiny model's training corpus (0: --inputs)
    batch_tokens: int = 8192  # padded tokens per forward batch (capture's --batch-tokens)
    quality_steps: int = 400
    buffer_batches: list[int] = field(default_factory=lambda: [16, 0])  # store-free sides of quality (0: default)
    rounds: int = 3
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    threads: int = 1
    device: str = "cpu"


def _common(b: BenchConfig, steps: int, seed: int) -> dict:
    return dict(steps=steps, batch_size=b.batch_size, expansion=b.expansion, seed=seed, log_every=steps,
                val_every=0, ckpt_every=0, dead_tokens=200_000, init_rows=8192, progress=False, device=b.device)


def _stream(b: BenchConfig, out: Path, points: list[str], steps: int, seed: int, ks: list[int], net, tok,
            buffer_batches: int = 0) -> float:
    cfg = StreamTrainConfig(model=b.model, inputs=b.inputs, out=str(out), points=points, batch_tokens=b.batch_tokens,
                            **{**_common(b, steps, seed), "expansion": [b.expansion], "k": ks,
                               "buffer_batches": buffer_batches})
    t0 = time.perf_counter()
    train_many(cfg, model=net, tok=tok)
    return time.perf_counter() - t0


def _store_train(b: BenchConfig, store: Path, out: Path, point: str, steps: int, seed: int) -> float:
    cfg = TrainConfig(store=str(store), out=str(out), point=point, k=b.k, **_common(b, steps, seed))
    t0 = time.perf_counter()
    train(cfg, open_store(store))
    return time.perf_counter() - t0


def speed(b: BenchConfig, tmp: Path, net, tok) -> None:
    t_cap, t_train, t_sf, t_n = [], [], [], {2: [], 4: []}
    m: dict = {}
    for r in range(b.rounds):  # alternate the sides; medians (the machine is shared)
        t0 = time.perf_counter()
        run_capture(CaptureConfig(model=b.model, inputs=b.inputs, out=str(tmp / f"store1-{r}"), points=[b.point],
                                  batch_tokens=b.batch_tokens, device=b.device, progress=False),
                    model=net, tokenizer=tok)
        t_cap.append(time.perf_counter() - t0)
        rows = open_store(tmp / f"store1-{r}").num_rows("train")
        # whole shuffle rounds within one pass: store-free forwards exactly what it trains on, capture one pass
        bb = StreamTrainConfig(batch_size=b.batch_size, batch_tokens=b.batch_tokens).buffer_batches_for(1)
        steps = bb * max(1, rows // (bb * b.batch_size))
        t_train.append(_store_train(b, tmp / f"store1-{r}", tmp / f"st{r}", b.point, steps, 0))
        t_sf.append(_stream(b, tmp / f"sf1-{r}", [b.point], steps, 0, [b.k], net, tok))
        m = json.loads((tmp / f"sf1-{r}" / b.point / f"topk-x{b.expansion}-k{b.k}" / "metrics.jsonl").read_text()
                       .splitlines()[-1])
        for ks in ([b.k, 2 * b.k], [b.k, 2 * b.k, b.k // 2, b.k + b.k // 2]):
            t_n[len(ks)].append(_stream(b, tmp / f"sf{len(ks)}-{r}", [b.point], steps, 0, ks, net, tok))
    med = statistics.median
    cap, trn, sf = med(t_cap), med(t_train), med(t_sf)
    tokens = steps * b.batch_size
    print(f"\n== speed: {tokens:,} tokens ({steps} steps x {b.batch_size}; {tokens / rows:.2f} passes over {rows:,} "
          f"training rows), {b.expansion}x latents, k={b.k}, buffer {bb} batches, medians of {b.rounds} alternating "
          f"rounds")
    print(f"capture+train   {cap + trn:7.2f} s  {tokens / (cap + trn):8,.0f} tok/s  ({cap:.2f} s capture + {trn:.2f} s "
          f"train)")
    print(f"store-free      {sf:7.2f} s  {tokens / sf:8,.0f} tok/s  (capture+train) / store-free = "
          f"{(cap + trn) / sf:.2f}")
    print(f"per forwarded row: capture {len(open_store(tmp / 'store1-0')) / cap:,.0f} rows/s (a whole pass, "
          f"writes included), store-free forward {m['forward_tokens_per_s']:,.0f} rows/s")
    print(f"forward share   {m['forward_fraction']:.0%} of the store-free loop (forward "
          f"{m['forward_tokens_per_s']:,.0f} tok/s, SAE steps {m['sae_tokens_per_s']:,.0f} tok/s; last round)")
    for n, ts in t_n.items():
        print(f"{n} SAEs on the point  {med(ts):7.2f} s  = {med(ts) / sf:.2f}x one SAE")


def quality(b: BenchConfig, tmp: Path, net, tok) -> None:
    store = tmp / "store2"
    run_capture(CaptureConfig(model=b.model, inputs=b.inputs, out=str(store), points=[b.point, b.point2],
                              batch_tokens=b.batch_tokens,
                              device=b.device, progress=False), model=net, tokenizer=tok)
    st = open_store(store)
    auto = StreamTrainConfig(batch_size=b.batch_size, batch_tokens=b.batch_tokens).buffer_batches_for(1)
    sides = ["store"] + [f"store-free bb{bb or f'{auto} (default)'}" for bb in b.buffer_batches]
    fvu: dict[tuple[str, str], list[float]] = {}
    for seed in b.seeds:
        for bb in b.buffer_batches:
            _stream(b, tmp / f"q{seed}-{bb}", [b.point, b.point2], b.quality_steps, seed, [b.k], net, tok, bb)
        for p in (b.point, b.point2):
            _store_train(b, store, tmp / f"qs{seed}-{p}", p, b.quality_steps, seed)
            where = [tmp / f"qs{seed}-{p}" / "sae"] + [tmp / f"q{seed}-{bb}" / p / f"topk-x{b.expansion}-k{b.k}" / "sae"
                                                      for bb in b.buffer_batches]
            for side, path in zip(sides, where):
                fvu.setdefault((p, side), []).append(activation_metrics(load(path), st, 4096, point=p)["fvu"])
    print(f"\n== quality: held-out FVU (the store's validation split, {st.num_rows('val'):,} of {len(st):,} rows), "
          f"{b.quality_steps} "
          f"steps x {b.batch_size}, seeds {b.seeds}; two points in one store-free run (bbN: --buffer-batches N) vs "
          f"one store run per point; paired difference = store-free - store, same seed")
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else float("nan"))
    for p in (b.point, b.point2):
        ref = fvu[(p, "store")]
        for side in sides:
            v = fvu[(p, side)]
            d = [y - x for x, y in zip(ref, v)]
            print(f"{p:26s} {side:26s} {statistics.mean(v):.4f} +- {sd(v):.4f}" + ("" if side == "store" else
                  f"   paired diff {statistics.mean(d):+.4f} +- {sd(d):.4f}") + "   per seed: "
                  + ", ".join(f"{x:.4f}" for x in v))


def main(argv: list[str] | None = None) -> None:
    b = parse_config(BenchConfig, argv, description=__doc__)
    torch.set_num_threads(b.threads)
    b = dataclasses.replace(b, model=str(resolve_model(b.model)))  # a folder, a .gguf file or a name (smollm2)
    net, tok = llama.load_model(b.model, device=b.device), llama.Tokenizer.from_file(b.model)
    with tempfile.TemporaryDirectory(prefix="stream_bench_") as d:
        if b.corpus_docs and not b.inputs:  # documents of the tiny model's own training corpus (not its heldout)
            from llama.tiny.corpus import build_corpus
            (Path(d) / "corpus.txt").write_text("\n".join(build_corpus().train[:b.corpus_docs]) + "\n")
            b = dataclasses.replace(b, inputs=[str(Path(d) / "corpus.txt")])
        speed(b, Path(d), net, tok)
        if b.seeds:
            quality(b, Path(d), net, tok)


if __name__ == "__main__":
    main()
