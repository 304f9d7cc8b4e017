"""Dashboard: built from a real top-contexts folder (scripts' own pipeline on a tiny random model + SAE), every
page exists, every link resolves, numbers and highlights come from the analysis arrays, text is HTML-escaped."""
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
    (root / "train" / "eval.json").write_text(json.dumps({"l0": 4.0, "fvu": 0.25, "ce": {"ce_loss_recovered": 0.9}}))
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


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    paths = make_analysis(root)
    index = build_dashboard(DashboardConfig(analysis=str(paths["analysis"]), out=str(root / "site"), progress=False))
    return paths, index


def test_every_page_and_link_exists(built):
    paths, index = built
    site = index.parent
    pages = [index] + sorted((site / "latents").glob("*.html"))
    assert len(pages) == 1 + 24
    for p in pages:
        parser = Links()
        parser.feed(p.read_text(encoding="utf-8"))
        assert parser.refs, p
        for ref in parser.refs:
            assert not re.match(r"^(https?:)?//", ref), f"{p.name} loads {ref} from the network"
            target = (p.parent / ref.split("#")[0].split("?")[0]).resolve()
            assert target.is_file(), f"{p.name}: broken link {ref}"
    assert (site / "dashboard_config.json").is_file()


def test_numbers_and_highlights_come_from_the_analysis(built):
    from sae.analysis.top_contexts import load_top_contexts
    paths, index = built
    tc = load_top_contexts(paths["analysis"])
    freq = np.load(paths["analysis"] / "freq.npy")
    live = int(np.argmax(freq))
    rec = tc.latent(live)
    html = (index.parent / "latents" / f"{live}.html").read_text(encoding="utf-8")
    # the top "max" context: the marked peak token carries the latent's max activation and full shading
    top = rec["max"][0]
    peak = re.search(r'<span class="t pk" style="background:rgba\(255,120,0,([0-9.]+)\)" title="[^"]*" '
                     r'data-act="([^"]+)">', html)
    assert peak is not None
    assert float(peak.group(2)) == pytest.approx(top["acts"][top["pos"] - top["start"]], rel=1e-3)
    assert float(peak.group(2)) == pytest.approx(rec["max_act"], rel=1e-3)
    assert float(peak.group(1)) == 1.0
    shown = [float(a) for a in re.findall(r'data-act="([^"]+)"', html)]
    assert max(shown) == pytest.approx(rec["max_act"], rel=1e-3)
    rows = re.findall(r"<tr><td class=tok>(.*?)</td><td class=num>(.*?)</td></tr>", html)
    assert len(rows) == len(rec["promoted"]) + len(rec["suppressed"]) == 10
    assert [float(v) for _, v in rows] == pytest.approx([t["logit"] for t in rec["promoted"] + rec["suppressed"]],
                                                        rel=1e-2)
    dead = int(np.argmin(freq))
    assert freq[dead] == 0 and "never fired" in (index.parent / "latents" / f"{dead}.html").read_text()
    text = index.read_text(encoding="utf-8")
    assert f"{(freq == 0).mean():.1%}" in text  # dead fraction on the overview
    assert "ce.ce_loss_recovered" in text and "0.9" in text and "<polyline" in text  # eval + training curve
    assert "<h3>fvu</h3>" in text and "<h3>l0</h3>" not in text  # a constant series is not drawn as a curve


def test_text_is_escaped(built):
    _, index = built
    site = index.parent
    page0 = (site / "latents" / "0.html").read_text(encoding="utf-8")
    assert "angle &lt;brackets&gt; &amp; cats" in page0 and "<brackets>" not in page0
    assert "fires on &lt;cat&gt;" in page0
    for p in (site / "latents").glob("*.html"):
        body = p.read_text(encoding="utf-8")
        assert "<cat>" not in body and body.count("<script") == 1


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
    assert sorted(p.name for p in (tmp_path / "site" / "latents").iterdir()) == ["0.html", "1.html", "2.html"]
    r = subprocess.run([sys.executable, "scripts/dashboard.py", "--analysis", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and r.stderr.startswith("error:") and "missing" in r.stderr
