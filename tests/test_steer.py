"""Steering: the SAE splice leaves the clean model untouched, adds/clamps latents exactly as the SAE's weights say,
and generation streams steered vs unsteered rows side by side. References are computed densely from the weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama import ModelArgs, Transformer
from llama.cli import UserError
from sae.config import SAEConfig
from sae.model import SAE
from sae.steering.steer import SAESplice, Steer, find_latents, parse_steer, steered_stream, top_active

HOOK = "blocks.1.hook_resid_post"


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16, max_seq_len=64)
    return Transformer(args).eval()


def tiny_sae(d: int = 32, n: int = 96, k: int = 6, seed: int = 0, normalize: str = "scalar") -> SAE:
    sae = SAE(SAEConfig(d_in=d, n_latents=n, k=k, hook_name=HOOK, normalize=normalize), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial biases and scale, so every term of the formula matters
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(d, generator=g))
        sae.norm_scale.fill_(0.7)
    return sae.eval()


def dense_code(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Independent TopK reference: z = ReLU(TopK(W_enc (x s - b_dec) + b_enc)), dense [N, n]."""
    pre = (x * sae.norm_scale - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    vals, idx = pre.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))


def resid(model: Transformer, tokens: torch.Tensor, edit=None) -> torch.Tensor:
    return model(tokens, capture=[HOOK], edit=edit).activations[HOOK]


@pytest.fixture(scope="module")
def setup():
    model, sae = tiny_model(), tiny_sae()
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    return model, sae, tokens


def test_no_steering_is_exactly_the_clean_model(setup):
    model, sae, tokens = setup
    clean = model(tokens).logits
    for splice in (SAESplice(sae), SAESplice(sae, record=4), SAESplice(sae, [Steer(5, 0.0)])):
        logits = model(tokens, edit={HOOK: splice}).logits
        torch.testing.assert_close(logits, clean, rtol=0, atol=1e-5)
    assert torch.equal(model(tokens, edit={HOOK: SAESplice(sae, record=4)}).logits, clean)


def test_add_moves_the_residual_by_strength_times_decoder_row(setup):
    model, sae, tokens = setup
    x = resid(model, tokens)
    for latent, s in ((7, 3.0), (40, -2.5)):
        x2 = resid(model, tokens, {HOOK: SAESplice(sae, [Steer(latent, s)])})
        expected = x + s * sae.W_dec[latent].detach() / sae.norm_scale  # decoder row in raw space
        torch.testing.assert_close(x2, expected, rtol=1e-5, atol=1e-5)


def test_clamp_sets_the_latent_value(setup):
    model, sae, tokens = setup
    x = resid(model, tokens)
    z = dense_code(sae, x.reshape(-1, 32)).reshape(*x.shape[:2], -1)
    latent = int(z.gt(0).sum((0, 1)).argmax())  # a latent active somewhere
    assert z[..., latent].gt(0).any()
    for value in (0.0, 4.0):
        x2 = resid(model, tokens, {HOOK: SAESplice(sae, [Steer(latent, value, "clamp")])})
        delta = (value - z[..., latent:latent + 1]) * sae.W_dec[latent].detach() / sae.norm_scale
        torch.testing.assert_close(x2, x + delta, rtol=1e-5, atol=1e-5)


def test_pure_reconstruction_matches_dense_reference(setup):
    model, sae, tokens = setup
    x = resid(model, tokens).reshape(-1, 32)
    x_hat = ((dense_code(sae, x) @ sae.W_dec + sae.b_dec) / sae.norm_scale).detach()
    got = resid(model, tokens, {HOOK: SAESplice(sae, error_term=False)}).reshape(-1, 32)
    torch.testing.assert_close(got, x_hat, rtol=1e-5, atol=1e-5)
    assert (got - x).norm() > 1e-3  # a random SAE is a poor reconstruction: the two modes really differ


def test_token_normalised_sae_keeps_error_term_exact():
    model, sae = tiny_model(), tiny_sae(normalize="token")
    tokens = torch.randint(0, 61, (1, 7))
    clean = model(tokens).logits
    got = model(tokens, edit={HOOK: SAESplice(sae, [Steer(3, 0.0), Steer(9, 0.0)])}).logits
    torch.testing.assert_close(got, clean, rtol=0, atol=1e-5)


def test_rows_mask_steers_only_selected_rows(setup):
    model, sae, tokens = setup
    x = resid(model, tokens)
    x2 = resid(model, tokens, {HOOK: SAESplice(sae, [Steer(7, 5.0)], rows=[False, True])})
    assert torch.equal(x2[0], x[0])
    assert (x2[1] - x[1]).abs().max() > 0.5


def test_record_reports_top_latents_of_the_steered_code(setup):
    model, sae, tokens = setup
    splice = SAESplice(sae, [Steer(11, 50.0)], record=3)
    x = resid(model, tokens)
    model(tokens, edit={HOOK: splice})
    z = dense_code(sae, x[:, -1])
    z[:, 11] += 50.0
    vals, ids = z.topk(3, dim=-1)
    assert splice.last is not None and splice.last.indices[:, 0].tolist() == [11, 11]
    torch.testing.assert_close(splice.last.values, vals, rtol=1e-5, atol=1e-5)
    assert splice.last.indices.tolist() == ids.tolist()
    r = top_active(torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[4, 4, 2]]), 2)  # duplicates are summed
    assert r.indices.tolist() == [[4, 2]] and r.values.tolist() == [[3.0, 0.5]]


class Label:
    def __init__(self, label: str, description: str = "", confidence: float = 0.5, detection_score=None):
        self.label, self.description, self.confidence, self.detection_score = label, description, confidence, detection_score


def test_parse_steer_and_label_search():
    labels = {3: Label("dogs and puppies", confidence=0.9, detection_score=0.6),
              8: Label("hot dogs", confidence=0.2, detection_score=0.9),
              12: Label("cats", description="pets like dogs", confidence=1.0)}
    assert find_latents("DOGS", labels) == [8, 3, 12]  # label hits by detection score, then description hits
    assert parse_steer("12:4") == Steer(12, 4.0, "add")
    assert parse_steer("12:-1.5:clamp") == Steer(12, -1.5, "clamp")
    assert parse_steer("hot dogs:6", labels) == Steer(8, 6.0, "add")
    assert parse_steer("puppies:0:clamp", labels) == Steer(3, 0.0, "clamp")
    for bad, msg in (("12", "TARGET:STRENGTH"), ("12:x", "numeric"), (":3", "missing"), ("zebra:3", "no latent label"),
                     ("dogs:3", "no labels table")):
        with pytest.raises(UserError, match=msg):
            parse_steer(bad, labels if bad != "dogs:3" else None)
    sae = tiny_sae()
    for steer, msg in ((Steer(96, 1.0), r"\[0, 96\)"), (Steer(1, float("nan")), "strength"),
                       (Steer(1, 1.0, "mul"), "mode")):
        with pytest.raises(UserError, match=msg):
            SAESplice(sae, [steer])


class CharTokenizer:
    """Stand-in tokenizer for generation over a 61-token random model: id i <-> one character."""
    stop_tokens: set[int] = set()

    def decode(self, ids):
        return "".join(chr(65 + i) for i in ids)

    def encode(self, s: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [0] * bos + [ord(c) - 65 for c in s]


def test_steered_stream_side_by_side_matches_plain_generation(setup):
    from llama.generate import generate
    model, sae, _ = setup
    tok = CharTokenizer()
    prompt = [1, 5, 9, 2]
    plain = generate(model, tok, [prompt], 12, temperature=0.0).tokens[0]
    events = list(steered_stream(model, tok, sae, [prompt, prompt], [Steer(7, 40.0)], 12, rows=[True, False],
                                 record=3))
    steered = [e.token for e in events if e.index == 0]
    unsteered = [e.token for e in events if e.index == 1]
    assert unsteered == plain  # the unsteered side is exactly the clean model
    assert steered != plain  # a strong steer changes the greedy completion
    assert "".join(e.text for e in events if e.index == 1) == tok.decode(plain)
    assert all(e.latents[0][0] == 7 for e in events if e.index == 0)  # the steered latent dominates
    with pytest.raises(UserError, match="hook_name"):
        bad = tiny_sae()
        bad.cfg.hook_name = ""
        list(steered_stream(model, tok, bad, [prompt], [], 2))


# ---- the web UI's server (HTTP level; the page itself is tested in a browser in test_browser.py) -------------
def start_server(model, sae, labels=None):
    import threading
    from sae.steering.steer import Steering
    from sae.steering.ui import SteerServer
    server = SteerServer(Steering(model, CharTokenizer(), sae, labels or {}), port=0, max_new_tokens=32)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def post(url: str, body: bytes):
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url + "api/generate", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def test_ui_server_streams_side_by_side_and_validates(setup):
    import json
    import urllib.request
    from llama.generate import generate
    model, sae, _ = setup
    labels = {7: Label("dog things"), 9: Label("cats")}
    server = start_server(model, sae, labels)
    try:
        url = server.url
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as r:
            assert "<title>SAE steering</title>" in r.read().decode()
        with urllib.request.urlopen(url + "api/latents?q=dog", timeout=10) as r:
            assert json.loads(r.read()) == [{"latent": 7, "label": "dog things"}]
        with urllib.request.urlopen(url + "api/latents?q=", timeout=10) as r:
            assert [d["latent"] for d in json.loads(r.read())] == [7, 9]  # empty query: the labelled latents
        with urllib.request.urlopen(url + "api/latents?q=999", timeout=10) as r:
            assert json.loads(r.read()) == []
        with urllib.request.urlopen(url + "api/info", timeout=10) as r:
            assert json.loads(r.read())["n_latents"] == 96
        body = {"prompt": "ABC", "steers": [{"latent": 7, "strength": 40.0, "mode": "add"}],
                "max_new_tokens": 10, "temperature": 0}
        status, headers, text = post(url, json.dumps(body).encode())
        assert status == 200 and headers["Transfer-Encoding"] == "chunked"
        msgs = [json.loads(line) for line in text.splitlines()]
        assert msgs[-1] == {"done": True}
        clean = [m["token"] for m in msgs[:-1] if m["side"] == "clean"]
        steered = [m["token"] for m in msgs[:-1] if m["side"] == "steered"]
        plain = generate(model, CharTokenizer(), [[0, 0, 1, 2]], 10, temperature=0.0).tokens[0]
        assert clean == plain and steered != plain
        assert all(m["latents"][0][:1] == [7] and m["latents"][0][2] == "dog things"
                   for m in msgs[:-1] if m["side"] == "steered")
        bad = [({"prompt": ""}, "prompt"), ({"prompt": "A" * 5000}, "prompt"),
               ({"prompt": "A", "steers": [{"latent": 96, "strength": 1}]}, "latent"),
               ({"prompt": "A", "steers": [{"latent": 1, "strength": 1e9}]}, "strength"),
               ({"prompt": "A", "steers": [{"latent": 1, "strength": 1, "mode": "mul"}]}, "steer"),
               ({"prompt": "A", "steers": [{"latent": 1, "strength": 1}] * 9}, "at most 8"),
               ({"prompt": "A", "max_new_tokens": 33}, "max_new_tokens"),
               ({"prompt": "A", "temperature": -1}, "temperature"), ({"prompt": "A", "top_p": 0}, "top_p"),
               ({"prompt": "A", "seed": 1.5}, "seed"), ({"prompt": "A", "chat": "yes"}, "chat"), ([1, 2], "object")]
        for req, msg in bad:
            status, _, text = post(url, json.dumps(req).encode())
            assert status == 400 and msg in json.loads(text)["error"], (req, text)
        for raw in (b"{nope", b'{"prompt": "A", "temperature": NaN}'):
            status, _, text = post(url, raw)
            assert status == 400, text
        with urllib.request.urlopen(url + "api/latents?q=../../etc/passwd", timeout=10) as r:
            assert json.loads(r.read()) == []
    finally:
        server.shutdown()
        server.server_close()
    from sae.steering.ui import SteerServer
    with pytest.raises(UserError, match="loopback"):
        SteerServer(None, host="0.0.0.0")


# ---- measured steering check (bench/steering.py runs it on the embedded tiny model) ------------------------
def test_steering_raises_the_promoted_tokens_frequency():
    from sae.analysis.latent_stats import logit_lens
    from sae.steering.check import measure_steering, pick_target, sign_test
    model = tiny_model(1)
    sae = tiny_sae(seed=2)
    sae.cfg.hook_name = "blocks.2.hook_resid_post"
    lens = logit_lens(sae.W_dec.detach(), model.norm.weight, model.output.weight, n_tokens=1)
    target = pick_target(model, sae, exclude=[0])
    assert lens.promoted_ids[target.latent, 0] == target.token  # the analysis' logit lens agrees
    assert pick_target(model, sae, token=5).token == 5
    prompts = [[0, 3, 4], [0, 10], [0, 7, 7, 1], [0, 20, 2]]
    eff = measure_steering(model, CharTokenizer(), sae, prompts, target, strength=30.0, seeds=range(4),
                           max_new_tokens=8, temperature=1.0)
    assert eff.n_pairs == 16 and eff.tokens_clean == eff.tokens_steered == 16 * 8
    # the final RMSNorm caps what one direction can do (here ~12% of tokens at saturation), from ~0 unsteered
    assert eff.rate_steered > eff.rate_clean + 0.05 and eff.sign_p < 0.01 and eff.cohens_d > 0.8
    assert eff.topic_steered > eff.topic_clean
    none = measure_steering(model, CharTokenizer(), sae, prompts, target, strength=0.0, seeds=range(2),
                            max_new_tokens=8, temperature=0.0)
    assert none.hits_clean == none.hits_steered and none.wins == none.losses == 0  # no steering, no effect
    assert sign_test(8, 0) == pytest.approx(2 / 256) and sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(1, 9) == pytest.approx(2 * 11 / 1024)


# ---- scripts/steer.py on the embedded tiny model ------------------------------------------------------------
TINY = Path(__file__).resolve().parents[1] / "weights" / "tiny"


def test_steer_script_on_tiny_model(tmp_path, capsys):
    import json
    from llama.checkpoint import load_model
    from llama.generate import text_completion
    from llama.tokenizer import Tokenizer
    from sae.formats import save
    from scripts.steer import main
    model, tok = load_model(TINY).eval(), Tokenizer.from_file(TINY)
    hook = f"blocks.{model.args.n_layers - 1}.hook_resid_post"
    sae = SAE(SAEConfig(d_in=model.args.dim, n_latents=64, k=8, hook_name=hook), seed=0)
    save(sae, tmp_path / "sae")
    (tmp_path / "labels.json").write_text(json.dumps({"format": "llama-sae-labels/1", "latents": {
        "5": {"label": "python keywords", "description": "", "confidence": 0.9, "detection_score": 0.8}}}))
    out = tmp_path / "res.json"
    main(["--model", str(TINY), "--sae", str(tmp_path / "sae"), "--labels", str(tmp_path / "labels.json"),
          "--prompt", "The function", "Once upon a time", "--steer", "python:60", "--temperature", "0",
          "--max-new-tokens", "8", "--show-latents", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "steer latent 5 'python keywords': add 60" in printed
    res = json.loads(out.read_text())
    plain = text_completion(model, tok, ["The function", "Once upon a time"], 8, temperature=0.0)
    assert [r["unsteered"] for r in res["results"]] == [c.text for c in plain]
    assert any(r["steered"] != r["unsteered"] for r in res["results"])
    assert all(t["latents"][0][0] == 5 for r in res["results"] for t in r["latents"])  # steered latent on top
    assert (tmp_path / "res.config.json").is_file()
    from llama.generate import chat_completion
    main(["--model", str(TINY), "--sae", str(tmp_path / "sae"), "--chat", "--system", "Be brief.", "--prompt",
          "What is a list?", "--steer", "5:60", "--temperature", "0", "--max-new-tokens", "6", "--out", str(out)])
    chat = chat_completion(model, tok, [[{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "What is a list?"}]], 6, temperature=0.0)
    assert json.loads(out.read_text())["results"][0]["unsteered"] == chat[0].text
    with pytest.raises(UserError, match="no latent label contains 'zebra'"):
        main(["--model", str(TINY), "--sae", str(tmp_path / "sae"), "--labels", str(tmp_path / "labels.json"),
              "--steer", "zebra:3"])
    with pytest.raises(UserError, match=r"\[0, 64\)"):
        main(["--model", str(TINY), "--sae", str(tmp_path / "sae"), "--steer", "64:3"])


# ---- each side lists the latents of its own forward (steered vs unsteered never mixed up) --------------------
def own_latents(model, sae, prompt: list[int], tokens: list[int], steers: list[Steer], r: int) -> list[list]:
    """Reference, independent of SAESplice: the r most active latents where each generated token was chosen,
    from this side's own token sequence through the plain model (the splice sits at the hook, so the hook's input
    is the clean model's residual on that sequence), steers added to that code for the steered side."""
    seq = torch.tensor([prompt + tokens[:-1]])
    z = dense_code(sae, resid(model, seq)[0])[len(prompt) - 1:]  # [len(tokens), n]
    for s in steers:
        z[:, s.latent] = z[:, s.latent] + s.strength if s.mode == "add" else s.strength
    vals, ids = z.topk(r, dim=-1)
    return [[(i, v) for i, v in zip(row_i, row_v) if v > 0] for row_i, row_v in zip(ids.tolist(), vals.tolist())]


def assert_latents(got: list[list], want: list[list]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [i for i, _ in g] == [i for i, _ in w]
        assert [v for _, v in g] == pytest.approx([v for _, v in w], rel=1e-3, abs=1e-3)


def test_record_with_rows_lists_each_rows_own_code(setup):
    model, sae, tokens = setup
    splice = SAESplice(sae, [Steer(11, 50.0)], rows=[True, False], record=3)
    x = resid(model, tokens)
    model(tokens, edit={HOOK: splice})
    z = dense_code(sae, x[:, -1])
    clean = z[1].topk(3)
    z[0, 11] += 50.0
    steered = z[0].topk(3)
    assert splice.last.indices[0].tolist() == steered.indices.tolist() and steered.indices[0] == 11
    assert splice.last.indices[1].tolist() == clean.indices.tolist() and 11 not in clean.indices.tolist()
    torch.testing.assert_close(splice.last.values[1], clean.values, rtol=1e-5, atol=1e-5)


def test_ui_generate_lists_each_sides_latents_from_its_own_forward(setup):
    import json
    model, sae, _ = setup
    server = start_server(model, sae, {7: Label("dog things")})
    try:
        body = {"prompt": "ABC", "steers": [{"latent": 7, "strength": 40.0}], "max_new_tokens": 10, "temperature": 0}
        status, _, text = post(server.url, json.dumps(body).encode())
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200
    msgs = [json.loads(line) for line in text.splitlines()][:-1]
    prompt = CharTokenizer().encode("ABC")
    for side, steers in (("steered", [Steer(7, 40.0)]), ("clean", [])):
        got = [m for m in msgs if m["side"] == side and m["stop"] != "stop"]
        want = own_latents(model, sae, prompt, [m["token"] for m in got], steers, 5)
        assert_latents([[(i, a) for i, a, _ in m["latents"]] for m in got], want)
    assert not any(i == 7 for m in msgs if m["side"] == "clean" for i, _, _ in m["latents"])  # not the steer's


def test_steer_script_shows_each_sides_latents_under_its_heading(tmp_path, capsys):
    import json
    from llama.checkpoint import load_model
    from llama.tokenizer import Tokenizer
    from sae.formats import save
    from scripts.steer import main
    model, tok = load_model(TINY).eval(), Tokenizer.from_file(TINY)
    hook = f"blocks.{model.args.n_layers - 1}.hook_resid_post"
    sae = SAE(SAEConfig(d_in=model.args.dim, n_latents=64, k=8, hook_name=hook), seed=0).eval()
    save(sae, tmp_path / "sae")
    (tmp_path / "labels.json").write_text(json.dumps({"format": "llama-sae-labels/1", "latents": {
        "5": {"label": "python keywords", "description": "", "confidence": 0.9, "detection_score": 0.8},
        "6": {"label": "", "description": "", "confidence": 0.1, "detection_score": None}}}))
    main(["--model", str(TINY), "--sae", str(tmp_path / "sae"), "--labels", str(tmp_path / "labels.json"),
          "--prompt", "The function", "--steer", "5:60", "6:1", "--temperature", "0", "--max-new-tokens", "6",
          "--show-latents", "3", "--out", str(tmp_path / "res.json")])
    printed = capsys.readouterr().out
    assert "steer latent 5 'python keywords': add 60\nsteer latent 6: add 1\n" in printed  # no '' for no label
    steered_part, unsteered_part = printed.split("--- steered:\n")[1].split("--- unsteered:\n")
    res = json.loads((tmp_path / "res.json").read_text())["results"][0]
    prompt = tok.encode("The function", bos=True, eos=False)

    def shown(part: str) -> list[list[int]]:
        return [[int(d.split("=")[0].split(" ")[0]) for d in ln.split("  ")[-1].split(", ")]
                for ln in part.splitlines()[1:] if ln.startswith("  ")]

    import sae.steering.steer as steer_mod
    with torch.no_grad():
        for part, key, steers in ((steered_part, "latents", [Steer(5, 60.0), Steer(6, 1.0)]),
                                  (unsteered_part, "unsteered_latents", [])):
            ids = [t["token_id"] for t in res[key]]
            x = model(torch.tensor([prompt + ids[:-1]]), capture=[hook]).activations[hook][0, len(prompt) - 1:]
            acts, idx = steer_mod.steer_code(*sae.encode(x), steers)
            want = steer_mod.top_active(acts, idx, 3)
            want_ids = [[i for i, v in zip(r_i, r_v) if v > 0] for r_i, r_v in zip(want.indices.tolist(),
                                                                                     want.values.tolist())]
            assert shown(part) == want_ids == [[i for i, _ in t["latents"]] for t in res[key]]
    assert all(5 not in row for row in shown(unsteered_part)) and all(row[0] == 5 for row in shown(steered_part))
    with pytest.raises(UserError, match=r"\[0, 64\)"):
        main(["--model", str(TINY), "--sae", str(tmp_path / "sae"), "--steer", "3:1", "64:3"])
    assert "steer latent" not in capsys.readouterr().out  # refused before any steer is announced


@pytest.mark.parametrize("normalize", ["scalar", "none"])
def test_attention_sink_rows_keep_x_exactly(normalize):
    """Rows ~100x the typical norm (position 0 / BOS of a real model) are never spliced; the others are."""
    sae = tiny_sae(normalize=normalize)
    if normalize == "none":
        sae.norm_scale.fill_(1.0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, 32, generator=g) * (32 ** 0.5 / float(sae.norm_scale)) / 32 ** 0.5
    x[0, 0] *= 100.0  # a sink at position 0 of row 0 and one mid-row, as <|endoftext|> would be
    x[1, 7] *= 100.0
    flat = x.reshape(-1, 32)
    x_hat = ((dense_code(sae, flat) @ sae.W_dec + sae.b_dec) / sae.norm_scale).detach().reshape(x.shape)
    for splice in (SAESplice(sae, error_term=False), SAESplice(sae, [Steer(3, 2.0)], error_term=False)):
        out = splice(x)
        assert torch.equal(out[0, 0], x[0, 0]) and torch.equal(out[1, 7], x[1, 7])
        ordinary = torch.ones(2, 12, dtype=torch.bool)
        ordinary[0, 0] = ordinary[1, 7] = False
        if not splice.steers:
            torch.testing.assert_close(out[ordinary], x_hat[ordinary], rtol=1e-5, atol=1e-5)
        assert (out[ordinary] - x[ordinary]).norm() > 1e-3
    everywhere = SAESplice(sae, error_term=False, spare_sinks=False)(x)
    torch.testing.assert_close(everywhere, x_hat, rtol=1e-5, atol=1e-4)  # the switch turns the guard off
