"""Store-free training on the tiny model: the stream is capture's row stream, shuffled; resume is bit-identical;
nothing but SAE files, checkpoints and logs reach the disk; torchrun (data parallel and --distribute-saes, 2 gloo
ranks) trains the same SAEs as one process; bad flags are one clear error."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import llama
from llama.cli import UserError
from sae import load
from sae.activations.capture import context_batches, resolve_context
from sae.activations.inputs import expand_inputs, iter_documents
from sae.activations.sentences import split_sentences
from sae.activations.store import is_val_document
from sae.activations.stream import document_filter, open_stream
from sae.multi import StreamTrainConfig
from sae.train_many import train_many

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "weights" / "tiny"
P1, P2 = "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny() -> tuple:
    return llama.load_model(TINY), llama.Tokenizer.from_file(TINY)


def flags(out: Path, **kw) -> StreamTrainConfig:
    base = dict(model=str(TINY), out=str(out), points=[P1, P2], expansion=[2], k=[4, 8], max_docs=150, steps=12,
                batch_size=64, buffer_batches=4, batch_tokens=1024, log_every=4, val_every=6, val_batches=2,
                ckpt_every=4, init_rows=256, warmup_steps=2, dead_tokens=200, lr=2e-3, device="cpu", progress=False)
    return StreamTrainConfig(**{**base, **kw})


def sae_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("sae_weights.safetensors"))}


def test_stream_is_captures_row_stream_shuffled(tiny) -> None:
    """Rounds cover capture's rows of the training documents: every row of a pass exactly once before any repeats
    (no skip, no held-out document, no attention sink), each step mixing many documents, values equal to a direct
    forward of the context alone, and a buffer that does not grow with the steps."""
    model, tok = tiny
    cfg = resolve_context(flags(Path("unused"), max_docs=60))
    files = expand_inputs(cfg.inputs)
    stream = open_stream(cfg, model, tok, files, [P1, P2], [0], 1, 64, buffer_batches=8, seed=3)
    capture_rows = Counter(r for b in context_batches(cfg, files, tok, 0, 1, document_filter(0.05))
                           for r in zip(b.doc_id.tolist(), b.ctx.tolist(), b.pos.tolist()))
    n_pass = sum(capture_rows.values())
    steps = 8 * (-(-n_pass // 512))  # whole rounds of 8 x 64 rows, just past one pass over the documents
    got = [stream.next() for _ in range(steps)]
    assert stream.buffer_bytes() == 2 * 8 * 64 * 128 * 4  # 2 points x R rows x d_model x fp32
    rows = Counter(r for g in got for r in zip(g.doc_id.tolist(), g.ctx.tolist(), g.pos.tolist()))
    assert set(rows) == set(capture_rows) and all(n in (1, 2) for n in rows.values())
    assert sum(n == 2 for n in rows.values()) == steps * 64 - n_pass  # the second pass only after the first
    assert not is_val_document(np.array([r[0] for r in rows]), 0.05).any() and n_pass > 1000
    assert min(r[2] for r in rows) >= 1  # the attention sink (position 0, the BOS) is never a row
    n_docs = [len(set(g.doc_id.tolist())) for g in got]  # a batch is not one document (some hold 800 tokens)
    assert min(n_docs) >= 5 and np.median(n_docs) >= 10
    docs = list(iter_documents(files))
    for i in range(0, 64, 13):  # independent reference: the context rebuilt from the text, run alone
        d, c, p = int(got[0].doc_id[i]), int(got[0].ctx[i]), int(got[0].pos[i])
        ids = [tok.encode(s, bos=False, eos=False) for s in split_sentences(docs[d])]
        ctxs = [[tok.bos_id] + x[j:j + 63] for x in ids for j in range(0, len(x), 63)]
        with torch.no_grad():
            acts = model(torch.tensor([ctxs[c]]), capture=[P2]).activations[P2][0, p]
        torch.testing.assert_close(got[0].acts[P2][i], acts, rtol=2e-2, atol=2e-2)
    stream.close()


def test_a_stream_started_at_a_later_pass_continues_the_same_batches(tiny) -> None:
    """start_step far past several passes over the documents (skipped by counting, not by forwarding) gives the
    batches an uninterrupted stream gives at those steps."""
    model, tok = tiny
    cfg = resolve_context(flags(Path("unused"), max_docs=25))
    files = expand_inputs(cfg.inputs)
    run = open_stream(cfg, model, tok, files, [P1], [0], 1, 64, buffer_batches=3, seed=1)
    ref = [run.next() for _ in range(60)]
    passes = run.shards[0].epoch
    late = open_stream(cfg, model, tok, files, [P1], [0], 1, 64, buffer_batches=3, seed=1, start_step=55)
    assert passes >= 3 and late.shards[0].pass_rows < 0
    read, passes_of = [], late.shards[0].batches
    late.shards[0].batches = lambda e: read.append(e) or passes_of(e)
    for want in ref[55:]:
        got = late.next()
        assert torch.equal(got.acts[P1], want.acts[P1]) and (got.doc_id == want.doc_id).all()
    # the first pass is tokenized to count its rows, the passes wholly before step 55's round are not even read
    assert read[0] == 0 and read[-1] == passes and 1 not in read
    # forwarded: only the 2 rounds of steps 55-59 and the <= 1024-token forward batches they straddle
    assert late.timer.rows <= 2 * 3 * 64 + 2 * 1024 and late.timer.rows < run.timer.rows / 2
    run.close()
    late.close()


def test_resume_is_bit_identical_and_only_sae_files_and_checkpoints_are_written(tiny, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    model, tok = tiny
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(scratch))
    full = train_many(flags(tmp_path / "full"), model=model, tok=tok)
    assert [r["sae"] for r in full.summary] == ["topk-x2-k4", "topk-x2-k8"] * 2
    allowed = ("cfg.json", "sae_weights.safetensors", "metrics.jsonl", "train_config.json", "checkpoint.json",
               "summary.json", "summary.txt", "checkpoint-12.pt")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sorted({p.name for p in written}) == sorted(allowed)
    assert not any(scratch.iterdir())
    logs = [p for p in written if p.suffix in (".json", ".jsonl", ".txt")]
    assert sum(p.stat().st_size for p in logs) < 64 * 1024  # logs only: no activation is ever written
    assert len(sae_files(tmp_path / "full")) == 4

    class Kill(Exception):
        pass

    def kill_at_8(step: int, trainer) -> None:
        if step == 8:  # the checkpoint on disk is step 6, mid-round (4 steps a round): steps 7-8 are lost
            raise Kill

    with pytest.raises(Kill):
        train_many(flags(tmp_path / "b", ckpt_every=3), model=model, tok=tok, callback=kill_at_8)
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 6
    assert sorted(p.name for p in (tmp_path / "b" / P1 / "topk-x2-k4").glob("checkpoint-*")) == ["checkpoint-6.pt"]
    with pytest.raises(UserError, match="buffer_batches|data"):
        train_many(flags(tmp_path / "b", resume=True, buffer_batches=2), model=model, tok=tok)
    res = train_many(flags(tmp_path / "b", resume=True, ckpt_every=3), model=model, tok=tok)
    assert res.step == 12
    assert sae_files(tmp_path / "b") == sae_files(tmp_path / "full")  # bit for bit, every SAE of both points
    lines = [json.loads(ln) for ln in (tmp_path / "b" / P1 / "topk-x2-k8" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(ln) for ln in (tmp_path / "full" / P1 / "topk-x2-k8" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [4, 8, 12]  # the killed run's step-8 line is not doubled
    assert [(m["fvu"], m.get("val_fvu")) for m in lines] == [(m["fvu"], m.get("val_fvu")) for m in ref]
    for key in ("fvu", "l0", "dead", "val_fvu", "tokens_per_s", "forward_tokens_per_s", "sae_tokens_per_s"):
        assert key in lines[-1]
    def ctrl_c_at_5(step: int, trainer) -> None:
        if step == 5:  # Ctrl-C: the step ends, a checkpoint of it is written, the run stops
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train_many(flags(tmp_path / "c"), model=model, tok=tok, callback=ctrl_c_at_5)
    assert stopped.stopped == "SIGINT" and stopped.step == 5 and not sae_files(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "checkpoint.json").read_text())["step"] == 5
    with pytest.raises(UserError, match="already holds a training run"):  # neither --resume nor --overwrite
        train_many(flags(tmp_path / "c"), model=model, tok=tok)
    train_many(flags(tmp_path / "c", resume=True), model=model, tok=tok)
    assert sae_files(tmp_path / "c") == sae_files(tmp_path / "full")
    train_many(flags(tmp_path / "c", overwrite=True), model=model, tok=tok)  # a fresh run: the same SAEs again
    assert sae_files(tmp_path / "c") == sae_files(tmp_path / "full")
    back = load(tmp_path / "b" / P2 / "topk-x2-k4" / "sae")
    assert back.cfg.hook_name == P2 and back.cfg.n_latents == 256 and back.cfg.k == 4


def _torchrun(out: Path, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts/train_sae.py"), *_argv(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def _argv(out: Path) -> list[str]:
    return ["--model", str(TINY), "--out", str(out), "--points", P1, P2, "--n-latents", "128", "256", "--k", "4",
            "--max-docs", "120", "--steps", "10", "--batch-size", "64", "--buffer-batches", "2", "--batch-tokens",
            "1024", "--log-every", "5", "--val-every", "0", "--init-rows", "256", "--warmup-steps", "2",
            "--dead-tokens", "128", "--lr", "3e-3", "--device", "cpu", "--progress", "false"]


@pytest.mark.parametrize("mode", ["data-parallel", "distribute-saes"])
def test_torchrun_two_ranks_equal_one_process(tiny, tmp_path: Path, mode: str) -> None:
    """2 gloo ranks (each its own documents: data shard r) train the same 4 SAEs as one process running both
    data shards, AuxK included (latents die during the run): gradients all-reduced, or each SAE on one rank."""
    from llama.cli import parse_config
    model, tok = tiny
    _torchrun(tmp_path / "two", ["--distribute-saes"] if mode == "distribute-saes" else [])
    ref = train_many(parse_config(StreamTrainConfig, _argv(tmp_path / "one") + ["--data-shards", "2"]),
                     model=model, tok=tok)
    assert len(ref.summary) == 4
    for name in sae_files(tmp_path / "one"):
        a, b = load((tmp_path / "one" / name).parent), load((tmp_path / "two" / name).parent)
        for t in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(b, t), getattr(a, t), atol=2e-5, rtol=1e-4, msg=f"{name} {t}")
    log = tmp_path / "two" / P2 / "topk-n256-k4" / "metrics.jsonl"
    metrics = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert metrics[-1]["dead"] > 0  # AuxK was active in the compared run
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [r["sae"] for r in summary] == ["topk-n128-k4", "topk-n256-k4"] * 2


def test_bad_flags_are_one_clear_error(tiny, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data-shards 3"):
        train_many(flags(tmp_path, data_shards=3))
    with pytest.raises(UserError, match="drop --store"):
        flags(tmp_path, store="x").store_config()
    empty = tmp_path / "blank.txt"
    empty.write_text("\n\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts/train_sae.py"), "--inputs", str(empty), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "holds no documents" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(UserError, match="unknown capture point 'blocks.9.hook_resid_post'"):
        train_many(flags(tmp_path, points=["blocks.9.hook_resid_post"]), model=tiny[0], tok=tiny[1])


def test_val_fraction_one_leaves_nothing_to_train_on(tmp_path: Path) -> None:
    from sae.train_many import StreamTrainer
    with pytest.raises(UserError, match="--val-fraction 1.0 leaves no documents to train on"):
        StreamTrainer(flags(tmp_path / "s", val_fraction=1.0))
