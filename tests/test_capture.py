"""Capture end to end on a random-weight Llama (Meta layout) with its own SentencePiece tokenizer.

References are independent of the capture code: contexts from split_sentences + tok.encode per document, values
from a direct `model(tokens, capture=...)` on each context alone, statistics from numpy over the stored rows."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import llama
from llama.cli import UserError
from sae.activations import store_format as fmt
from sae.activations.capture import CaptureConfig, run_capture
from sae.activations.sentences import split_sentences
from sae.activations.store import open_store
from tests._capture_fixtures import make_model_dir, store_files, write_corpus

REPO = Path(__file__).resolve().parents[1]
POINTS = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("capture")
    model_dir = make_model_dir(root / "model")
    corpus = write_corpus(root / "corpus.txt", 60)
    return {"root": root, "model": model_dir, "corpus": corpus,
            "docs": corpus.read_text().splitlines(), "tok": llama.Tokenizer.from_file(model_dir),
            "net": llama.load_model(model_dir)}


def cfg(env: dict, out: Path, **kw) -> CaptureConfig:
    base = dict(model=str(env["model"]), inputs=[str(env["corpus"])], out=str(out), shard_rows=128,
                batch_tokens=512, pack_contexts=64, progress=False)
    return CaptureConfig(**{**base, **kw})


def by_context(store) -> dict[tuple[int, int], np.ndarray]:
    """(doc, ctx) -> global row indices ordered by position."""
    m = store.meta(0, len(store))
    order = np.lexsort((m["pos"], m["ctx"], m["doc_id"]))
    keys = np.stack([m["doc_id"][order], m["ctx"][order]], 1)
    cuts = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    return {(int(keys[g[0], 0]), int(keys[g[0], 1])): order[g] for g in np.split(np.arange(len(order)), cuts)}


def assert_bf16_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Stored rows are bf16 of the fp32 forward; a batched forward may differ in the last fp32 bits, so allow one
    bf16 step (2^-8 relative) on top of the rounding itself."""
    ref = ref.float()
    assert torch.all((got.float() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-5)


def test_round_trip_equals_direct_forward(env, tmp_path: Path) -> None:
    manifest = run_capture(cfg(env, tmp_path / "s", points=POINTS))
    store = open_store(tmp_path / "s")
    tok, net = env["tok"], env["net"]
    expected = {}  # independent reference: sentences of each document, each encoded with BOS
    for d, text in enumerate(env["docs"]):
        for c, sent in enumerate(split_sentences(text)):
            ids = tok.encode(sent, bos=True, eos=False)
            assert len(ids) <= 64  # the fixture's sentences fit one context each
            expected[(d, c)] = ids
    groups = by_context(store)
    assert set(groups) == set(expected)
    assert len(store) == manifest["rows"] == sum(len(v) - 1 for v in expected.values())  # no BOS, no padding
    meta = store.meta(0, len(store))
    for key, rows in groups.items():
        ids = expected[key]
        np.testing.assert_array_equal(meta["token_id"][rows], ids[1:])
        np.testing.assert_array_equal(meta["pos"][rows], np.arange(1, len(ids)))
    for key in list(expected)[::7]:  # direct forward, one context alone
        with torch.no_grad():
            acts = net(torch.tensor([expected[key]]), capture=POINTS).activations
        for p in POINTS:
            got = torch.stack([store.rows(int(i), int(i) + 1, point=p)[0] for i in groups[key]])
            assert_bf16_close(got, acts[p][0, 1:])
    for p in POINTS:
        x = store.rows(0, len(store), point=p).double().numpy()
        st = manifest["stats"][p]
        np.testing.assert_allclose(st["mean"], x.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(st["var"], x.var(0), rtol=1e-9)
        np.testing.assert_allclose(st["mean_norm"], np.linalg.norm(x, axis=1).mean(), rtol=1e-9)
    assert json.loads((tmp_path / "s" / fmt.CONFIG).read_text())["points"] == POINTS


def test_windows_keep_bos_and_input_formats(env, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = env["docs"][:20]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n".join(docs[:8]) + "\n\n")
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                                     for i, d in enumerate(docs[8:14])))
    pq.write_table(pa.table({"text": docs[14:]}), tmp_path / "in" / "c.parquet")
    (tmp_path / "all.txt").write_text("\n".join(docs))
    kw = dict(mode="windows", ctx_len=16, keep_bos=True, points=["blocks.1.hook_resid_pre"])
    run_capture(cfg(env, tmp_path / "folder", inputs=[str(tmp_path / "in")], **kw))
    run_capture(cfg(env, tmp_path / "plain", inputs=[str(tmp_path / "all.txt")], **kw))
    a, b = open_store(tmp_path / "folder"), open_store(tmp_path / "plain")
    assert len(a) == len(b)
    assert all(np.array_equal(u, v) for u, v in zip(a.meta(0, len(a)).values(), b.meta(0, len(b)).values()))
    assert torch.equal(a.rows(0, len(a)), b.rows(0, len(b)))
    bos, tok, groups, meta = env["tok"].bos_id, env["tok"], by_context(a), a.meta(0, len(a))
    for d, text in enumerate(docs):  # windows: 15 document tokens after a stored BOS
        ids = tok.encode(text, bos=False, eos=False)
        windows = [ids[i:i + 15] for i in range(0, len(ids), 15)]
        assert [k for k in groups if k[0] == d] == [(d, c) for c in range(len(windows))]
        for c, w in enumerate(windows):
            np.testing.assert_array_equal(meta["token_id"][groups[(d, c)]], [bos] + w)
    key = (3, 1)
    with torch.no_grad():
        ref = env["net"](torch.tensor([meta["token_id"][groups[key]].tolist()]),
                         capture=["blocks.1.hook_resid_pre"]).activations["blocks.1.hook_resid_pre"][0]
    assert_bf16_close(torch.stack([a.rows(int(i), int(i) + 1)[0] for i in groups[key]]), ref)


SNIPPET = """
import os, runpy, sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
if os.environ.get("THROTTLE") == "1":  # slow it down so the test can kill it mid-run; values are unchanged
    import llama.model as m, sae.activations.store_writer as w
    commit, forward = w.ShardWriter._commit, m.Transformer.forward
    w.ShardWriter._commit = lambda self: (commit(self), time.sleep(0.03))[0]
    m.Transformer.forward = lambda self, *a, **k: (time.sleep(0.03), forward(self, *a, **k))[1]
sys.argv = ["capture.py"] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def capture_cmd(env: dict, out: Path) -> list[str]:
    return [sys.executable, "-c", SNIPPET.format(repo=str(REPO), script=str(REPO / "scripts" / "capture.py")),
            "--model", str(env["model"]), "--inputs", str(env["corpus"]), "--out", str(out), "--shard-rows", "128",
            "--batch-tokens", "512", "--pack-contexts", "64", "--progress", "false"]


def sub_env(throttle: bool) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "THROTTLE": "1" if throttle else "0", "PYTHONPATH": str(REPO)}


def run_and_kill(cmd: list[str], out: Path, after_shards: int, extra_s: float) -> int:
    """Start the capture, SIGKILL it once `after_shards` more shards are committed (+ extra_s seconds)."""
    before = len(list((out / "shards").glob("r0_*.json"))) if (out / "shards").exists() else 0
    proc = subprocess.Popen(cmd, env=sub_env(True), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        done = len(list((out / "shards").glob("r0_*.json"))) if (out / "shards").exists() else 0
        if done - before >= after_shards:
            time.sleep(extra_s)
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"capture finished before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(list((out / "shards").glob("r0_*.json")))


def test_resume_after_kill_is_exact(env, tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(capture_cmd(env, ref), env=sub_env(False), check=True, capture_output=True)
    committed = [run_and_kill(capture_cmd(env, out), out, after_shards=k, extra_s=s)
                 for k, s in ((1, 0.0), (4, 0.017), (0, 0.4), (3, 0.041))]
    assert committed == sorted(committed) and committed[-1] < len(json.loads((ref / "manifest.json").read_text())
                                                                  ["shards"])
    assert not (out / "manifest.json").exists()
    with pytest.raises(UserError, match="incomplete"):
        open_store(out)
    subprocess.run(capture_cmd(env, out), env=sub_env(False), check=True, capture_output=True)
    got, want = store_files(out), store_files(ref)
    for files, folder in ((got, out), (want, ref)):  # the resolved config names its own --out; the rest must match
        files[fmt.CONFIG] = files[fmt.CONFIG].replace(str(folder).encode(), b"OUT")
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []  # byte for byte: shards, stats, manifest


def test_torchrun_two_ranks_same_rows_as_one(env, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    args = capture_cmd(env, one)[3:]
    subprocess.run([sys.executable, str(REPO / "scripts" / "capture.py"), *args], env=sub_env(False), check=True,
                   capture_output=True)
    args[args.index("--out") + 1] = str(two)
    r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                        str(REPO / "scripts" / "capture.py"), *args], env=sub_env(False), capture_output=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    a, b = open_store(one), open_store(two)
    assert b.manifest["world_size"] == 2 and {s["rank"] for s in b.manifest["shards"]} == {0, 1}
    assert len(a) == len(b)
    ma, mb = a.meta(0, len(a)), b.meta(0, len(b))
    ka = {k: i for i, k in enumerate(zip(ma["doc_id"], ma["ctx"], ma["pos"]))}
    order = np.array([ka[k] for k in zip(mb["doc_id"], mb["ctx"], mb["pos"])])  # same row set, any order
    assert sorted(order.tolist()) == list(range(len(a)))
    np.testing.assert_array_equal(ma["token_id"][order], mb["token_id"])
    assert_bf16_close(b.rows(0, len(b)), a.rows(0, len(a))[torch.from_numpy(order)])
    np.testing.assert_allclose(b.manifest["mean"], a.manifest["mean"], rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_empty_and_unsupported_inputs(env, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "nofield.jsonl").write_text('{"body": "Some text."}\nnot json\n')
    cases = {"missing.txt": "does not exist", "empty.txt": "is empty", "blank.txt": "holds no documents",
             "notes.csv": "unsupported file type", "nofield.jsonl": "no documents.*'text'", "*.xyz": "matches no"}
    for name, msg in cases.items():
        with pytest.raises(UserError, match=msg):
            run_capture(cfg(env, tmp_path / "s", inputs=[str(tmp_path / name)]))
    with pytest.raises(UserError, match="does not exist"):
        run_capture(cfg(env, tmp_path / "s", model=str(tmp_path / "no-model")))


def test_parquet_without_pyarrow_is_a_clear_error(env, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    with pytest.raises(UserError, match="needs pyarrow"):
        run_capture(cfg(env, tmp_path / "s", inputs=[str(tmp_path / "a.parquet")]))


def test_undecodable_lines_are_skipped_and_counted(env, tmp_path: Path) -> None:
    docs = [d.encode() for d in env["docs"][:12]]
    bad = docs[:4] + [b"caf\xe9 au lait \xff\xfe."] + docs[4:9] + [b"\x80\x81 broken"] + docs[9:]
    (tmp_path / "bad.txt").write_bytes(b"\n".join(bad) + b"\n")
    (tmp_path / "good.txt").write_bytes(b"\n".join(docs) + b"\n")
    m = run_capture(cfg(env, tmp_path / "bad", inputs=[str(tmp_path / "bad.txt")]))
    run_capture(cfg(env, tmp_path / "good", inputs=[str(tmp_path / "good.txt")]))
    assert m["skipped"] == {"undecodable": 2} and m["documents"] == 12
    a, b = open_store(tmp_path / "bad"), open_store(tmp_path / "good")
    assert torch.equal(a.rows(0, len(a)), b.rows(0, len(b)))
    assert all(np.array_equal(u, v) for u, v in zip(a.meta(0, len(a)).values(), b.meta(0, len(b)).values()))


def test_unknown_capture_point_lists_valid_ones(env, tmp_path: Path, capsys) -> None:
    from llama.cli import run_main
    sys.path.insert(0, str(REPO / "scripts"))
    import capture as script
    argv = ["--model", str(env["model"]), "--inputs", str(env["corpus"]), "--out", str(tmp_path / "s"),
            "--points", "blocks.7.hook_resid_post", "--progress", "false"]
    with pytest.raises(SystemExit) as e:
        run_main(script.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert "unknown capture point 'blocks.7.hook_resid_post'" in err and "0..2" in err and "hook_mlp_out" in err


def test_output_folder_of_another_store_is_refused_unless_overwrite(env, tmp_path: Path) -> None:
    out = tmp_path / "s"
    first = run_capture(cfg(env, out, points=["blocks.0.hook_resid_post"], max_docs=10))
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert run_capture(cfg(env, out, points=["blocks.0.hook_resid_post"], max_docs=10)) == first  # complete: no-op
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="holds a store of .*blocks.0.hook_resid_post.*--overwrite"):
        run_capture(cfg(env, out, points=["blocks.1.hook_resid_post"], max_docs=10))
    other = make_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="holds a store of model"):
        run_capture(cfg(env, out, model=str(other), points=["blocks.0.hook_resid_post"], max_docs=10))
    with pytest.raises(UserError, match="other settings.*ctx_len: 64 -> 32"):
        run_capture(cfg(env, out, points=["blocks.0.hook_resid_post"], max_docs=10, ctx_len=32))
    m = run_capture(cfg(env, out, points=["blocks.1.hook_resid_post"], max_docs=10, overwrite=True))
    assert open_store(out).points == ["blocks.1.hook_resid_post"] == m["points"]
    assert not list((out / "shards").glob("*blocks.0*"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not an activation store"):
        run_capture(cfg(env, tmp_path / "mine", overwrite=True))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_full_disk_is_a_clear_error_and_the_store_resumes_exactly(env, tmp_path: Path, monkeypatch) -> None:
    run_capture(cfg(env, tmp_path / "ref", max_docs=30))
    real, calls = fmt.atomic_save_npy, {"n": 0}

    def flaky(path: Path, arr: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 13:  # in the middle of the 3rd shard (5 files a shard)
            raise OSError(28, "No space left on device")
        real(path, arr)

    monkeypatch.setattr(fmt, "atomic_save_npy", flaky)
    with pytest.raises(UserError, match="disk is full.*resumable.*rerun the same command"):
        run_capture(cfg(env, tmp_path / "s", max_docs=30))
    assert len(fmt.committed_shards(tmp_path / "s", 0)) == 2 and not (tmp_path / "s" / "manifest.json").exists()
    monkeypatch.setattr(fmt, "atomic_save_npy", real)
    run_capture(cfg(env, tmp_path / "s", max_docs=30))
    got, want = store_files(tmp_path / "s"), store_files(tmp_path / "ref")
    del got[fmt.CONFIG], want[fmt.CONFIG]  # names its own --out
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)


def test_no_arguments_captures_the_embedded_tiny_model(tmp_path: Path, monkeypatch) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import capture as script
    monkeypatch.chdir(tmp_path)  # from any folder: the model is found in the repo, the store lands in ./out
    assert script.main(["--max-docs", "25", "--progress", "false"]) == 0  # the defaults, cut short for speed
    store = open_store(tmp_path / "out" / "activations" / "tiny")
    tiny = REPO / "weights" / "tiny"
    params = json.loads((tiny / "params.json").read_text())
    assert store.manifest["model"] == str(tiny) and store.d_model == params["dim"]
    assert store.manifest["hook_name"] == f"blocks.{round(2 * params['n_layers'] / 3) - 1}.hook_resid_post"
    assert [s["path"] for s in store.manifest["sources"]] == [str(tiny / "heldout.txt")]
    heldout = (tiny / "heldout.txt").read_text().splitlines()[:25]
    tok = llama.Tokenizer.from_file(tiny)
    assert len(store) == sum(len(tok.encode(s, bos=False, eos=False)) for d in heldout for s in split_sentences(d))


def test_min_pos_drops_early_positions_and_val_fraction_one_holds_out_everything(env, tmp_path: Path) -> None:
    docs = env["docs"][:24]
    run_capture(cfg(env, tmp_path / "all", mode="windows", ctx_len=16, max_docs=24, val_fraction=0.0))
    run_capture(cfg(env, tmp_path / "p2", mode="windows", ctx_len=16, max_docs=24, min_pos=2, val_fraction=1.0))
    a, b = open_store(tmp_path / "all"), open_store(tmp_path / "p2")
    ma, mb = a.meta(0, len(a)), b.meta(0, len(b))
    # reference: windows of 15 document tokens after a BOS; position 0 dropped (a), positions 0 and 1 dropped (b)
    windows = [len(ids[i:i + 15]) for d in docs for ids in [env["tok"].encode(d, bos=False, eos=False)]
               for i in range(0, len(ids), 15)]
    assert len(a) == sum(windows) and len(b) == sum(w - 1 for w in windows if w > 1)
    assert ma["pos"].min() == 1 and mb["pos"].min() == 2
    keep = ma["pos"] >= 2  # the same rows, in the same order, with the same values
    assert np.array_equal(ma["token_id"][keep], mb["token_id"]) and np.array_equal(ma["doc_id"][keep], mb["doc_id"])
    assert torch.equal(a.rows(0, len(a))[torch.from_numpy(keep)], b.rows(0, len(b)))
    assert a.num_rows("val") == 0 and b.num_rows("val") == len(b) and b.num_rows("train") == 0
    with pytest.raises(UserError, match="other settings.*min_pos: 2 -> 3"):
        run_capture(cfg(env, tmp_path / "p2", mode="windows", ctx_len=16, max_docs=24, min_pos=3, val_fraction=1.0))
    with pytest.raises(UserError, match="--min-pos must be in"):
        run_capture(cfg(env, tmp_path / "bad", ctx_len=16, min_pos=16))
