"""Top-activating contexts: the running top-N merge, the streaming histogram and the whole scan are compared with
brute-force references computed densely on small random data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama.cli import UserError
from sae.analysis.latent_stats import LatentStats, logit_lens
from sae.analysis.sources import StoreSource
from sae.analysis.top_contexts import TopContextsConfig, compute_top_contexts, load_top_contexts
from sae.analysis.topn import RunningTopN

torch.set_num_threads(1)
BOS = 1


class FakeSAE:
    """A TopK SAE with random weights: encode(x) -> (top_acts, top_indices), W_dec [L, d]."""

    def __init__(self, d: int, n_latents: int, k: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(d, n_latents, generator=g) / d**0.5
        self.b_enc = torch.randn(n_latents, generator=g) * 0.1
        self.W_dec = torch.nn.functional.normalize(torch.randn(n_latents, d, generator=g), dim=1)
        self.k = k

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        v, i = self.encode(x)
        return torch.zeros(x.shape[0], self.W_dec.shape[0]).scatter_(1, i, v)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = torch.relu(x @ self.W_enc + self.b_enc).topk(self.k, dim=1)
        return v, i


class FakeStore:
    """Rows of consecutive documents; each starts with BOS. Same read API as sae.activations.store (rows, meta, len)."""

    def __init__(self, n_docs: int, d: int, seed: int = 0, min_len: int = 2, max_len: int = 20):
        rng = np.random.default_rng(seed)
        lens = rng.integers(min_len, max_len + 1, n_docs)
        self.doc_id = np.repeat(np.arange(100, 100 + n_docs), lens)
        self.pos = np.concatenate([np.arange(n) for n in lens])
        self.token_id = rng.integers(2, 50, len(self.pos))
        self.token_id[self.pos == 0] = BOS
        self.ctx = self.pos // 8  # documents longer than 8 tokens hold several sentences (contexts)
        self.key = self.doc_id * 1000 + self.ctx  # one context per (doc, ctx)
        self.x = torch.from_numpy(rng.standard_normal((len(self.pos), d)).astype(np.float32)).to(torch.bfloat16)
        self.manifest = {"d_model": d, "rows": len(self.pos)}

    def __len__(self) -> int:
        return len(self.pos)

    def rows(self, i0: int, i1: int) -> torch.Tensor:
        return self.x[i0:i1]

    def meta(self, i0: int, i1: int) -> dict:
        return {"token_id": self.token_id[i0:i1], "doc_id": self.doc_id[i0:i1], "ctx": self.ctx[i0:i1], "pos": self.pos[i0:i1]}


class FakeTok:
    bos_id, n_words = BOS, 50

    def decode(self, ids: list[int]) -> str:
        return "".join(f"t{i}" for i in ids)


def test_running_topn_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    L, N, total = 37, 7, 300
    scores = torch.rand(L, total, generator=g)
    scores[scores < 0.6] = float("-inf")  # sparse: many rows end with fewer than N candidates
    scores[3] = float("-inf")  # a row that never gets a candidate
    top = RunningTopN(L, N, ("ctx",))
    c0 = 0
    for c in [1, 50, 13, 100, 0, 136]:  # uneven batch sizes
        top.merge(scores[:, c0:c0 + c], {"ctx": torch.arange(c0, c0 + c)})
        c0 += c
    assert c0 == total
    ref = scores.topk(N, dim=1)
    torch.testing.assert_close(top.values, ref.values)
    finite = torch.isfinite(ref.values)
    assert torch.equal(top.payload["ctx"][finite], ref.indices[finite])
    assert (top.payload["ctx"][~finite] == -1).all() and (~finite[3]).all()


def test_running_topn_sparse_merge_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(4)
    L, N, total = 29, 6, 400
    row = torch.randint(0, L - 2, (total,), generator=g)  # rows L-2, L-1 never get a candidate
    value = torch.rand(total, generator=g)
    top = RunningTopN(L, N, ("ctx", "pos"))
    for s0, s1 in [(0, 7), (7, 150), (150, 151), (151, 400)]:
        top.merge_sparse(row[s0:s1], value[s0:s1], {"ctx": torch.arange(s0, s1), "pos": torch.arange(s0, s1) * 10})
    for r in range(L):
        mine = sorted(((value[i].item(), i) for i in range(total) if row[i] == r), reverse=True)[:N]
        got = top.values[r][torch.isfinite(top.values[r])].tolist()
        assert got == pytest.approx([v for v, _ in mine])
        assert top.payload["ctx"][r, :len(mine)].tolist() == [i for _, i in mine]
        assert top.payload["pos"][r, :len(mine)].tolist() == [10 * i for _, i in mine]
        assert (top.payload["ctx"][r, len(mine):] == -1).all()


def test_histogram_is_exact_after_range_doublings() -> None:
    g = torch.Generator().manual_seed(1)
    L, B = 5, 16
    st = LatentStats(L, B)
    chunks = []
    for scale in [0.01, 0.3, 1.0, 70.0, 2.0]:  # ranges grow over time: bins must merge exactly
        acts = torch.rand(40, 3, generator=g) * scale * (torch.rand(40, 3, generator=g) > 0.3)
        idx = torch.randint(0, L - 1, (40, 3), generator=g)  # latent L-1 never fires
        st.update(acts, idx, 40)
        chunks.append((acts, idx))
    acts = torch.cat([c[0] for c in chunks]).reshape(-1).double().numpy()
    idx = torch.cat([c[1] for c in chunks]).reshape(-1).numpy()
    hi = st.hist_hi().double().numpy()
    for lat in range(L):
        v = acts[(idx == lat) & (acts > 0)]
        assert st.fire_count[lat] == len(v)
        if len(v) == 0:
            assert hi[lat] == 0 and st.hist[lat].sum() == 0
            continue
        assert v.max() < hi[lat] <= 2 * v.max()
        ref = np.bincount(np.floor(v / hi[lat] * B).astype(int), minlength=B)
        assert np.array_equal(st.hist[lat].numpy(), ref)
        assert np.isclose(st.max_act[lat].item(), v.max(), rtol=1e-6)
    assert np.allclose(st.freq().numpy(), [(((idx == i) & (acts > 0)).sum()) / 200 for i in range(L)])


def test_logit_lens_matches_dense_product() -> None:
    g = torch.Generator().manual_seed(2)
    W_dec, nw, W_out = torch.randn(10, 8, generator=g), torch.rand(8, generator=g) + 0.5, torch.randn(30, 8, generator=g)
    ll = logit_lens(W_dec, nw, W_out, n_tokens=4, chunk=3)
    dense = (W_dec * nw) @ W_out.T
    assert torch.equal(ll.promoted_ids, dense.argsort(1, descending=True)[:, :4])
    assert torch.equal(ll.suppressed_ids, dense.argsort(1)[:, :4])
    torch.testing.assert_close(ll.suppressed_logits, dense.sort(1).values[:, :4])


def _reference(store: FakeStore, sae: FakeSAE) -> dict[str, np.ndarray]:
    """Dense per-(doc, latent) scores with BOS excluded: max, mean, last, argmax position."""
    z = sae.dense(store.x.float()).numpy()
    z[store.token_id == BOS] = 0
    docs = np.unique(store.key)
    out = {k: np.zeros((len(docs), z.shape[1])) for k in ("max", "mean", "last")}
    for i, d in enumerate(docs):
        zz, nb = z[store.key == d], (store.token_id[store.key == d] != BOS).sum()
        out["max"][i], out["mean"][i], out["last"][i] = zz.max(0), zz.sum(0) / max(nb, 1), zz[-1]
    return {**out, "docs": docs, "z": z}


@pytest.mark.parametrize("batch_rows", [64, 37, 5])  # contexts split across batches (5: across several)
def test_scan_equals_brute_force(tmp_path: Path, batch_rows: int) -> None:
    d, L, k, N = 16, 96, 6, 5
    store, sae = FakeStore(60, d), FakeSAE(d, L, k)
    cfg = TopContextsConfig(n=N, batch_rows=batch_rows, window=8, hist_bins=16, n_random=20, progress=False)
    compute_top_contexts(StoreSource(store, batch_rows), sae, tmp_path, cfg, tokenizer=FakeTok())
    tc = load_top_contexts(tmp_path)
    ref = _reference(store, sae)
    doc_of = tc.array("contexts_doc_id") * 1000 + tc.array("contexts_ctx")
    assert tc.summary["n_contexts_seen"] == len(ref["docs"]) > 60 and tc.summary["n_tokens"] == int((store.token_id != BOS).sum())
    n_checked = 0
    for agg in ("max", "mean", "last"):
        acts, ctx = tc.array(f"{agg}_acts"), tc.array(f"{agg}_ctx")
        for lat in range(L):
            col = ref[agg][:, lat]
            order = np.argsort(-col, kind="stable")[:N]
            order = order[col[order] > 0]
            got = ctx[lat][ctx[lat] >= 0]
            assert len(got) == len(order), (agg, lat)
            np.testing.assert_allclose(acts[lat][:len(order)], col[order], rtol=1e-5, atol=1e-6)
            assert list(doc_of[got]) == list(ref["docs"][order]), (agg, lat)
            n_checked += len(got)
    assert n_checked > 3 * L  # the reference has real content
    # windows: the saved per-token activations equal the dense code on those tokens
    z, starts = ref["z"], np.flatnonzero(np.r_[True, store.key[1:] != store.key[:-1]])
    for lat in range(0, L, 7):
        for rec in tc.latent(lat)["max"]:
            row0 = tc.array("contexts_row0")[rec["ctx"]]
            assert row0 in starts
            a = z[row0 + rec["start"]: row0 + rec["start"] + len(rec["acts"]), lat]
            np.testing.assert_allclose(rec["acts"], a, rtol=2e-3, atol=1e-3)  # float16 storage
            assert rec["start"] <= rec["pos"] < rec["start"] + len(rec["acts"])
            assert np.isclose(a[rec["pos"] - rec["start"]], rec["score"], rtol=2e-3)
            assert rec["token_ids"] == store.token_id[row0 + rec["start"]: row0 + rec["start"] + len(a)].tolist()


def test_every_context_credits_many_latents(tmp_path: Path) -> None:
    """The earlier project's bug: each sentence credited only to its single top latent (6-10% labelled)."""
    d, L, k = 16, 256, 8
    store, sae = FakeStore(40, d, seed=3), FakeSAE(d, L, k, seed=3)
    compute_top_contexts(StoreSource(store, 128), sae, tmp_path,
                         TopContextsConfig(n=10, n_random=0, progress=False), tokenizer=FakeTok())
    tc = load_top_contexts(tmp_path)
    has_ctx = (tc.array("max_ctx") >= 0).any(1)
    fired = tc.array("fire_count") > 0
    assert np.array_equal(has_ctx, fired)  # every latent that fires anywhere gets contexts
    assert has_ctx.mean() > 0.5  # with only 40 sentences, far more latents than sentences get examples
    assert has_ctx.sum() > tc.summary["n_contexts_seen"]
    per_ctx = np.bincount(tc.array("max_ctx")[tc.array("max_ctx") >= 0], minlength=tc.summary["n_contexts"])
    assert (per_ctx > 1).mean() > 0.9  # a sentence is credited to many latents


def test_random_sample_records_fired_latents(tmp_path: Path) -> None:
    d, L, k = 16, 64, 4
    store, sae = FakeStore(50, d, seed=5), FakeSAE(d, L, k, seed=5)
    compute_top_contexts(StoreSource(store, 50), sae, tmp_path,
                         TopContextsConfig(n=3, n_random=10, progress=False), tokenizer=FakeTok())
    tc = load_top_contexts(tmp_path)
    ref = _reference(store, sae)
    rnd = tc.random_contexts()
    docs = [tc.array("contexts_doc_id")[c] * 1000 + tc.array("contexts_ctx")[c] for c, _ in rnd]
    assert len(rnd) == 10 and len(set(docs)) == 10
    for (c, fired), doc in zip(rnd, docs):
        i = int(np.flatnonzero(ref["docs"] == doc)[0])
        expect = {int(j): ref["max"][i, j] for j in np.flatnonzero(ref["max"][i] > 0)}
        assert set(fired) == set(expect)
        assert all(np.isclose(fired[j], expect[j], rtol=1e-5) for j in expect)


def test_bad_config_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--hist-bins"):
        TopContextsConfig(hist_bins=12)
    with pytest.raises(UserError, match="--n "):
        TopContextsConfig(n=0)


def _load_script(name: str):
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_end_to_end_real_store_and_sae(tmp_path: Path) -> None:
    """capture (real store) -> a real SAE file -> scripts/top_contexts.py; each kept context's score is recomputed by
    running the model on the context's tokens; the --text path and scripts/interpret.py --dry-run run too."""
    pytest.importorskip("sentencepiece")
    import llama
    import sae
    from sae.activations.capture import CaptureConfig, run_capture
    sys.path.insert(0, str(Path(__file__).parent))
    from _capture_fixtures import make_model_dir, write_corpus

    model_dir = make_model_dir(tmp_path / "model", dim=32, n_layers=2)
    corpus = write_corpus(tmp_path / "corpus.txt", 30)
    point = "blocks.1.hook_resid_post"
    store_dir = tmp_path / "store"
    run_capture(CaptureConfig(model=str(model_dir), inputs=[str(corpus)], out=str(store_dir), points=[point],
                              device="cpu", progress=False, shard_rows=256))
    sae_model = sae.build_sae(sae.SAEConfig(d_in=32, n_latents=64, k=4, hook_name=point, model=str(model_dir)))
    with torch.no_grad():
        sae_model.b_enc.normal_(0, 0.1)
    sae.save(sae_model, tmp_path / "sae")
    out = tmp_path / "analysis"
    script = _load_script("top_contexts")
    assert script.main(["--sae", str(tmp_path / "sae"), "--store", str(store_dir), "--out", str(out), "--n", "5",
                        "--batch-rows", "100", "--progress", "false", "--device", "cpu"]) == 0
    tc = load_top_contexts(out)
    assert tc.summary["has_vocab"] and tc.summary["has_logits"] and tc.summary["hook_name"] == point
    model, tok = llama.load_model(model_dir), llama.Tokenizer.from_file(model_dir)
    loaded = sae.load(tmp_path / "sae")
    checked = 0
    for lat in range(0, 64, 9):
        rec = tc.latent(lat)
        for c in rec["max"][:2]:
            ids = tc.context_tokens(c["ctx"])
            with torch.no_grad():  # the capture prepends BOS to each context and does not store it
                acts = model(torch.tensor([[tok.bos_id] + ids]), capture=[point]).activations[point][0, 1:]
                enc = loaded.encode(acts)
                z = torch.zeros(len(ids), 64).scatter_(1, enc.top_indices, enc.top_acts)
            assert abs(z[:, lat].max().item() - c["score"]) <= 0.05 * c["score"] + 0.02  # bf16 store
            assert int(z[:, lat].argmax()) == c["pos"] or z[c["pos"], lat] >= 0.95 * z[:, lat].max()
            checked += 1
        ref = ((loaded.W_dec[lat] * model.norm.weight) @ model.output.weight.T)
        assert rec["promoted"][0]["token_id"] == int(ref.argmax())
        assert rec["suppressed"][0]["token_id"] == int(ref.argmin())
    assert checked > 5
    # the --text path on the same model
    text_out = tmp_path / "analysis_text"
    assert script.main(["--sae", str(tmp_path / "sae"), "--text", str(corpus), "--model", str(model_dir), "--out",
                        str(text_out), "--n", "3", "--progress", "false", "--device", "cpu"]) == 0
    assert (load_top_contexts(text_out).array("max_ctx") >= 0).any(1).mean() > 0.5
    interp = _load_script("interpret")
    assert interp.main(["--analysis", str(out), "--dry-run", "--progress", "false"]) == 0
    n_prompts = len((out / "prompts.jsonl").read_text().splitlines())
    assert n_prompts == int(((tc.array("max_ctx") >= 0).any(1)).sum())
    assert json.loads((out / "interpret_config.json").read_text())["backend"] == "dry-run"


def test_script_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llama.cli import run_main
    script = _load_script("top_contexts")
    r = subprocess.run([sys.executable, str(Path(script.__file__)), "--store", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == "error: --sae is required (an SAE folder with cfg.json + " \
        "sae_weights.safetensors)\n"
    for argv, msg in [(["--sae", str(tmp_path)], "exactly one of --store"),
                      (["--sae", str(tmp_path / "nope"), "--store", "s"], "not a folder")]:
        with pytest.raises(SystemExit) as e:
            run_main(script.main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and msg in err and "Traceback" not in err
    with pytest.raises(UserError, match="not a top-contexts folder"):
        load_top_contexts(tmp_path)
