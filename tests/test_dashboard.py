"""Dashboard: built from a real top-contexts folder (scripts' own pipeline on a tiny random model + SAE), every
page and data file exists, every link resolves, numbers and windows come from the analysis arrays, text stays data,
and the size fits a 65k-latent SAE. (tests/test_browser.py renders it in Chromium.)"""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from llama import ModelArgs, Transformer
from llama.cli import UserError
from sae.analysis.dashboard import DashboardConfig, build_dashboard

torch.set_num_threads(1)
HOOK = "blocks.1.hook_resid_post"
CHARS = " abcdefghijklmnopqrstuvwxyz.,!?'<>&\"\n"
TEXT = ["the cat sat on the mat.", "a dog & a <cat> ran \"fast\"!", "zebras eat grass, don't they?",
        "the quick brown fox jumps over the lazy dog.", "cats and dogs are pets.", "x < y and y > z",
        "hello world, hello again.", "numbers? none here!"] * 3


class CharTok:
    """Character tokenizer: id 1 = BOS, ids 2.. = CHARS."""
    bos_id, eos_id, pad_id, n_words = 1, 0, -1, 2 + len(CHARS)
    stop_tokens: set[int] = set()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return ([1] if bos else []) + [2 + CHARS.index(c) for c in text.lower() if c in CHARS]

    def decode(self, ids: list[int]) -> str:
        return "".join("<|bos|>" if i == 1 else CHARS[i - 2] if 2 <= i < self.n_words else "" for i in ids)


def make_analysis(root: Path, n_latents: int = 24, labels: bool = True) -> dict[str, Path]:
    """A tiny model + SAE, the real top-contexts pipeline over TEXT, plus labels / eval / metrics files."""
    from sae.analysis.sources import TextSource
    from sae.analysis.top_contexts import TopContextsConfig, compute_top_contexts
    from sae.config import SAEConfig
    from sae.formats import save
    from sae.model import SAE
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, multiple_of=16,
                                  max_seq_len=128)).eval()
    sae = SAE(SAEConfig(d_in=32, n_latents=n_latents, k=4, hook_name=HOOK, model="tiny-random"), seed=1).eval()
    with torch.no_grad():
        sae.W_dec[-1] = 0.0  # keep one latent dead: its encoder can never win (see below)
        sae.W_enc[-1] = 0.0
        sae.b_enc[-1] = -100.0
    sae_dir = save(sae, root / "train" / "sae")
    text = root / "text.txt"
    text.write_text("\n".join(TEXT), encoding="utf-8")
    tok = CharTok()
    cfg = TopContextsConfig(sae=str(sae_dir), text=str(text), out=str(root / "analysis"), n=5, window=16,
                            hist_bins=16, n_logit_tokens=5, n_random=6, progress=False, device="cpu")
    src = TextSource(model, tok, HOOK, text)
    compute_top_contexts(src, sae, cfg.out, cfg, tokenizer=tok, lm_weights=(model.norm.weight, model.output.weight))
    if labels:
        lab = {"format": "llama-sae-labels/1", "backend": "test", "model": "none", "errors": {},
               "latents": {"0": {"label": "angle <brackets> & cats", "description": "fires on <cat>",
                                 "confidence": 0.8, "detection_score": 0.75, "detection": None},
                           "3": {"label": "dog words", "description": "dogs", "confidence": 0.4,
                                 "detection_score": None, "detection": None}}}
        (root / "analysis" / "labels.json").write_text(json.dumps(lab))
    (root / "train" / "eval.json").write_text(json.dumps({"l0": 4.0, "fvu": 0.25, "ce": {"ce_loss_recovered": 0.9},
                                                         "dead_fraction": 0.5, "density_hist": {"dead": 12}}))
    (root / "train" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "fvu": 1.0 / (1 + s), "l0": 4.0, "lr": 1e-3}) + "\n" for s in range(0, 200, 10)))
    return {"analysis": root / "analysis", "sae": sae_dir, "root": root}


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("href", "src"):
            if a.get(key):
                self.refs.append(a[key])


def read_script(path: Path, fn: str) -> list:
    """The JSON arguments of a data script `window.fn(a, b);`."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"window.{fn}(") and text.endswith(");\n"), path
    return json.loads("[" + text[len(f"window.{fn}("):-3] + "]")


def decode(s: str, width: int) -> list[int]:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_"  # as documented in dashboard_data
    digits = [alphabet.index(c) for c in s]
    return [sum(d << 6 * (width - 1 - i) for i, d in enumerate(digits[j:j + width])) for j in range(0, len(digits), width)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    paths = make_analysis(root)
    index = build_dashboard(DashboardConfig(analysis=str(paths["analysis"]), out=str(root / "site"), progress=False))
    return paths, index


def test_every_page_and_link_exists(built):
    paths, index = built
    site = index.parent
    pages = [index, site / "latent.html"]
    for p in pages:
        parser = Links()
        parser.feed(p.read_text(encoding="utf-8"))
        assert parser.refs, p
        for ref in (r for r in parser.refs if not r.startswith("#")):  # "#": the latent page's own pager
            assert not re.match(r"^(https?:)?//", ref), f"{p.name} loads {ref} from the network"
            target = (p.parent / ref.split("#")[0].split("?")[0]).resolve()
            assert target.is_file(), f"{p.name}: broken link {ref}"
    meta = read_script(site / "data/meta.js", "__meta")[0]
    assert meta["n_latents"] == 24 and meta["shard"] == 64
    assert sorted(f.name for f in (site / "data").iterdir()) == ["index.js", "latents-0.js", "meta.js", "vocab.js"]
    assert (site / "dashboard_config.json").is_file()
    assert not list(site.rglob("*.tmp"))


def test_numbers_and_windows_come_from_the_analysis(built):
    from sae.analysis.top_contexts import load_top_contexts
    paths, index = built
    site = index.parent
    tc = load_top_contexts(paths["analysis"])
    width = read_script(site / "data/meta.js", "__meta")[0]["width"]
    s, recs = read_script(site / "data/latents-0.js", "__shard")
    assert s == 0 and len(recs) == 24
    freq = np.load(paths["analysis"] / "freq.npy")
    for lat in (int(np.argmax(freq)), 0, 5):
        rec, ref = recs[lat], tc.latent(lat)
        assert rec["n"] == ref["fire_count"] and rec["f"] == pytest.approx(ref["freq"], rel=1e-3)
        assert rec["x"] == pytest.approx(ref["max_act"], rel=1e-3) and rec["m"] == pytest.approx(ref["mean_act"], rel=1e-3)
        counts = ref["hist"]["counts"]
        first = next((i for i, c in enumerate(counts) if c), 0)
        assert rec["h"][0] == pytest.approx(ref["hist"]["edges"][-1]) and rec["h"][1] == first
        assert rec["h"][2:] == counts[first:first + len(rec["h"]) - 2] and sum(rec["h"][2:]) == sum(counts)
        assert decode(rec["p"][0], width) == [t["token_id"] for t in ref["promoted"]]
        assert rec["s"][1] == pytest.approx([t["logit"] for t in ref["suppressed"]], rel=1e-3)
        for agg in ("max", "mean", "last"):
            scores, which = rec["c"][agg][0], decode(rec["c"][agg][1], 2)
            assert scores == pytest.approx([c["score"] for c in ref[agg]][:20], rel=1e-3) and len(which) == len(scores)
            for ctx, w in zip(ref[agg], which):
                peak, ids, fired = rec["w"][w]
                # the shown window is a run of the analysed window that holds the peak, acts as analysed
                off = next(i for i in range(len(ctx["token_ids"]) - len(ids) // width + 1)
                           if ctx["token_ids"][i:i + len(ids) // width] == decode(ids, width)
                           and ctx["start"] + i + peak == ctx["pos"])
                shown = [0.0] * (len(ids) // width)
                for k in range(0, len(fired), 3):
                    o, q = decode(fired[k], 1)[0], decode(fired[k + 1:k + 3], 2)[0]
                    shown[o] = q * rec["x"] / 1000
                assert shown == pytest.approx(ctx["acts"][off:off + len(shown)], abs=1e-3 * rec["x"] + 1e-6)
                assert len(shown) <= 24
    dead = int(np.argmin(freq))
    assert freq[dead] == 0 and all(recs[dead]["c"][a] == [[], ""] for a in ("max", "mean", "last"))
    idx = read_script(site / "data/index.js", "__index")[0]
    assert idx["freq"] == pytest.approx(freq.tolist(), rel=1e-3) and idx["labels"]["3"][0] == "dog words"


def test_overview_shows_one_named_dead_figure_and_named_metrics(built):
    paths, index = built
    freq = np.load(paths["analysis"] / "freq.npy")
    text = index.read_text(encoding="utf-8")
    dead = int((freq == 0).sum())
    assert f"<b>{dead:,} ({dead / len(freq):.1%})</b><span>dead latents</span>" in text
    assert text.count("<span>dead latents</span>") == 1  # the one dead figure, defined in its title
    assert "dead_fraction" not in text and "density_hist" not in text and "never fired)" not in text
    assert "never fired on the" in text and "tokens analysed by top_contexts" in text
    assert "CE loss recovered (vs zeroed)" in text and "ce.ce_loss_recovered" not in text and "0.9" in text
    assert "<polyline" in text and "<h3>FVU (training batch)</h3>" in text
    assert "L0 (training batch)" not in text  # a constant series is not drawn as a curve


def test_text_stays_data(built):
    """Labels and tokens reach the pages only as JSON strings in data scripts (the page sets textContent);
    the HTML pages themselves hold none of it (the browser test checks the rendering)."""
    _, index = built
    site = index.parent
    for page in (index, site / "latent.html"):
        body = page.read_text(encoding="utf-8")
        assert "brackets" not in body and "<cat>" not in body
    recs = read_script(site / "data/latents-0.js", "__shard")[1]
    assert recs[0]["lab"][:2] == ["angle <brackets> & cats", "fires on <cat>"]
    app = (site / "assets/app.js").read_text()
    assert "innerHTML" not in app.replace("never innerHTML", "")


def test_dashboard_size_fits_65k_latents(tmp_path):
    """The budget of the issue: a 65,536-latent dashboard of ~500 MB, i.e. ~7.6 KB per latent, measured on a
    synthetic analysis at real shapes (Llama 3 vocabulary, 50 contexts per aggregation, full 64-token windows, every
    latent labelled; bench/dashboard_size.py runs the full 65k)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from dashboard_size import BUDGET, synthetic_analysis
    analysis = synthetic_analysis(tmp_path / "a", 512, contexts_pool=5000)
    site = build_dashboard(DashboardConfig(analysis=str(analysis), out=str(tmp_path / "site"), progress=False)).parent
    per_latent = sum(f.stat().st_size for f in (site / "data").glob("latents-*.js")) / 512
    index_per_latent = (site / "data/index.js").stat().st_size / 512
    assert per_latent + index_per_latent < BUDGET, (per_latent, index_per_latent)
    assert max(f.stat().st_size for f in (site / "data").glob("latents-*.js")) < 600_000  # one page's shard


def test_rebuilding_replaces_an_older_dashboard(tmp_path):
    paths = make_analysis(tmp_path / "a", n_latents=8, labels=False)
    site = tmp_path / "site"
    (site / "latents").mkdir(parents=True)
    (site / "latents" / "7.html").write_text("an older layout's page")
    (site / "data").mkdir()
    (site / "data" / "latents-9.js").write_text("stale")
    (site / "dashboard_config.json").write_text("{}")
    (site / "notes.txt").write_text("mine")
    build_dashboard(DashboardConfig(analysis=str(paths["analysis"]), out=str(site), progress=False))
    assert not (site / "latents").exists() and not (site / "data" / "latents-9.js").exists()
    assert (site / "notes.txt").read_text() == "mine"


def test_errors_name_the_input(tmp_path):
    with pytest.raises(UserError, match="summary.json"):
        build_dashboard(DashboardConfig(analysis=str(tmp_path), out=str(tmp_path / "o"), progress=False))
    paths = make_analysis(tmp_path / "a", n_latents=8, labels=False)
    bad = tmp_path / "labels.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="--labels"):
        build_dashboard(DashboardConfig(analysis=str(paths["analysis"]), out=str(tmp_path / "o"), labels=str(bad),
                                        progress=False))
    with pytest.raises(UserError, match="file not found"):
        build_dashboard(DashboardConfig(analysis=str(paths["analysis"]), out=str(tmp_path / "o"),
                                        metrics=str(tmp_path / "nope.jsonl"), progress=False))


def test_script_runs(tmp_path, capsys):
    import subprocess
    import sys
    paths = make_analysis(tmp_path, n_latents=8, labels=False)
    r = subprocess.run([sys.executable, "scripts/dashboard.py", "--analysis", str(paths["analysis"]), "--out",
                        str(tmp_path / "site"), "--max-latents", "3", "--progress", "false"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert len(read_script(tmp_path / "site" / "data" / "latents-0.js", "__shard")[1]) == 3
    assert len(read_script(tmp_path / "site" / "data" / "index.js", "__index")[0]["freq"]) == 3
    r = subprocess.run([sys.executable, "scripts/dashboard.py", "--analysis", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and r.stderr.startswith("error:") and "missing" in r.stderr
