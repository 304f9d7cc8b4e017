"""Generation on a small random-weight llama.Transformer: cached decode vs full forward, batched vs one-by-one vs a
cache-free reference loop, stop tokens, the top-p sampler vs a reference computation, streaming, `edit`, the CLI."""
from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import pytest
import torch

from llama.chat import ChatFormat
from llama.cli import UserError, run_main
from llama.config import ModelArgs
from llama.generate import (
    IncrementalDecoder, TokenEvent, chat_completion, generate, sample_next, text_completion, top_p_filter,
)
from llama.model import Transformer
from llama.tokenizer import Tokenizer

V = 96
PROMPTS = [[1, 5, 9], [1, 7, 3, 3, 8, 2, 11], [1], [1, 40, 41, 42, 43]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16,
                     max_seq_len=64)
    m = Transformer(args).eval()
    with torch.no_grad():  # sharper logits than the default init, so greedy choices are far from ties
        m.output.weight.mul_(8.0)
    return m


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model(V)


@torch.no_grad()
def reference_greedy(model: Transformer, prompt: list[int], n: int, edit=None) -> list[int]:
    """No cache, no batching: rerun the whole sequence every step and take the argmax of the last position."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]), edit=edit).logits[0, -1].argmax()))
    return seq[len(prompt):]


@torch.no_grad()
def test_cached_decode_equals_full_forward(model):
    torch.manual_seed(1)
    tokens = torch.randint(0, V, (2, 20))
    full = model(tokens).logits  # (2, 20, V), no cache
    model.setup_caches(2, 32)
    try:
        parts = [model(tokens[:, :8], 0).logits]  # prefill 8 positions
        parts += [model(tokens[:, t:t + 1], t).logits for t in range(8, 20)]  # then one at a time
    finally:
        model.clear_caches()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_batched_greedy_equals_one_by_one_and_reference(model):
    n = 12
    batched = generate(model, None, PROMPTS, n)
    assert batched.stop_reasons == ["length"] * len(PROMPTS)
    for p, got in zip(PROMPTS, batched.tokens):
        assert got == generate(model, None, [p], n).tokens[0]
        assert got == reference_greedy(model, p, n)
    assert all(layer.attention.cache is None for layer in model.layers)  # caches freed afterwards


def test_stop_tokens(model):
    free = generate(model, None, PROMPTS, 12).tokens
    stop = free[1][4]  # a token row 1 produces at step 5 (maybe earlier too)
    out = generate(model, None, PROMPTS, 12, stop_tokens={stop})
    for row_free, row, reason in zip(free, out.tokens, out.stop_reasons):
        if stop in row_free:  # cut just before the first stop token, which is not part of the output
            assert (row, reason) == (row_free[:row_free.index(stop)], "stop")
        else:
            assert (row, reason) == (row_free, "length")
    # a stop token inside the prompt does not stop anything
    prompt = PROMPTS[1][:3] + [stop] + PROMPTS[1][3:]
    ref = reference_greedy(model, prompt, 6)
    assert generate(model, None, [prompt], 6, stop_tokens={stop}).tokens[0] == \
        (ref[:ref.index(stop)] if stop in ref else ref)
    # the model's max_seq_len caps a row: "length"
    long = generate(model, None, [[1] * 60], 10)
    assert len(long.tokens[0]) == 4 and long.stop_reasons == ["length"]


def reference_top_p(probs: list[float], p: float) -> dict[int, float]:
    """The nucleus by hand: most likely first, add tokens until their total reaches p, renormalise."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i]
        if mass >= p:
            break
    return {i: probs[i] / mass for i in kept}


def test_top_p_filter_matches_reference():
    g = torch.Generator().manual_seed(0)
    for p in (0.1, 0.5, 0.9, 0.99):
        probs = torch.softmax(torch.randn(8, 50, generator=g, dtype=torch.float64) * 2, dim=-1)
        filt = top_p_filter(probs, p)
        for row, frow in zip(probs.tolist(), filt):
            ref = torch.zeros(50, dtype=torch.float64)
            for i, q in reference_top_p(row, p).items():
                ref[i] = q
            torch.testing.assert_close(frow, ref)
    probs = torch.softmax(torch.randn(3, 50, dtype=torch.float64), -1)
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_sampler_support_frequencies_and_seed():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]]).repeat(20000, 1)
    temperature, p = 0.7, 0.8
    ref = reference_top_p(torch.softmax(logits[0] / temperature, -1).tolist(), p)
    draw = lambda seed: sample_next(logits, temperature, p, torch.Generator().manual_seed(seed))  # noqa: E731
    a = draw(123)
    assert torch.equal(a, draw(123)) and not torch.equal(a, draw(124))
    counts = torch.bincount(a, minlength=8).double() / len(a)
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(ref)  # nothing outside the nucleus
    for i, q in ref.items():  # frequencies within 5 standard errors of the renormalised probabilities
        assert abs(counts[i].item() - q) < 5 * (q * (1 - q) / len(a)) ** 0.5
    # temperature 0 is argmax
    x = torch.randn(4, 30)
    assert torch.equal(sample_next(x, 0.0, 0.5), x.argmax(-1))


def test_seeded_sampling_reproducible(model):
    run = lambda seed: generate(model, None, PROMPTS, 10, temperature=1.0, top_p=0.9, seed=seed).tokens  # noqa: E731
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_streaming_matches_and_is_lazy(model):
    for kw in (dict(), dict(temperature=0.9, top_p=0.8, seed=3)):
        full = generate(model, None, PROMPTS, 9, stop_tokens={17}, **kw)
        stream = generate(model, None, PROMPTS, 9, stop_tokens={17}, stream=True, **kw)
        first = next(stream)
        assert isinstance(first, TokenEvent)
        assert model.layers[0].attention.cache is not None  # still generating: the first token came early
        events = [first] + list(stream)
        assert model.layers[0].attention.cache is None
        got = [[e.token for e in events if e.index == i and e.stop_reason != "stop"] for i in range(len(PROMPTS))]
        assert got == full.tokens
        assert [next(e.stop_reason for e in reversed(events) if e.index == i) for i in range(len(PROMPTS))] \
            == full.stop_reasons


def test_edit_passed_through(model):
    point = "blocks.1.hook_resid_pre"
    calls: list[tuple[int, ...]] = []

    def identity(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x

    base = generate(model, None, PROMPTS, 8)
    assert generate(model, None, PROMPTS, 8, edit={point: identity}) == base
    assert len(calls) > 8 and set(calls) == {(4, 1, 64)}  # every forward: prefill and each decode step
    shift = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 20
    steered = generate(model, None, PROMPTS, 8, edit={point: lambda x: x + shift})
    assert steered.tokens != base.tokens
    assert steered.tokens[0] == reference_greedy(model, PROMPTS[0], 8, edit={point: lambda x: x + shift})


def test_bad_arguments(model):
    for kw in (dict(prompts=[[]]), dict(prompts=[[V]]), dict(prompts=[]), dict(prompts=[[1] * 64]),
               dict(prompts=[[1]], max_new_tokens=0), dict(prompts=[[1]], top_p=0.0),
               dict(prompts=[[1]], temperature=-1.0)):
        kw = {"max_new_tokens": 4, **kw}
        with pytest.raises(UserError):
            generate(model, None, **kw)


# ---- text, chat, streaming text -------------------------------------------------------------------------------

CORPUS = ["the llama walked to the river and met a fox", "once upon a time a fox said hello to a llama",
          "numbers 1 2 3 and words like river, hill, morning"] * 30


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory) -> Tokenizer:
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=V, minloglevel=2,
                                   control_symbols=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                                   hard_vocab_limit=False)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def spm_model(spm_tok) -> Transformer:
    return tiny_model(spm_tok.n_words)


def test_text_and_chat_completion(spm_model, spm_tok):
    model = spm_model
    prompts = ["the llama", "once upon a time a fox"]
    ids = [spm_tok.encode(p, bos=True, eos=False) for p in prompts]
    outs = text_completion(model, spm_tok, prompts, 10, temperature=0.0)
    for c, p in zip(outs, ids):
        assert c.tokens == generate(model, spm_tok, [p], 10).tokens[0]
        # the completion is what decoding prompt + completion adds after the prompt's own text (keeps the space
        # SentencePiece would drop when the completion is decoded alone)
        assert spm_tok.decode(p + c.tokens) == spm_tok.decode(p) + c.text
    streamed = ["", ""]
    for ch in text_completion(model, spm_tok, prompts, 10, temperature=0.0, stream=True):
        streamed[ch.index] += ch.text
    assert streamed == [c.text for c in outs]

    dialog = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello llama"}]
    chat = chat_completion(model, spm_tok, [dialog], 6, temperature=0.0)[0]
    assert chat.tokens == reference_greedy(model, ChatFormat(spm_tok).encode_dialog_prompt(dialog), 6)[:len(chat.tokens)]
    assert chat.stop_reason in ("stop", "length")


def test_incremental_decoder_holds_partial_utf8():
    meta = pytest.importorskip("llama_models.llama3.tokenizer")
    tok = Tokenizer.from_file(Path(meta.__file__).parent / "tokenizer.model")
    text = "llamas 🦙🦙 say «héllo» 日本語 👩‍👩‍👧"
    ids = tok.encode(text, bos=False, eos=False)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(t, final=(i == len(ids) - 1)) for i, t in enumerate(ids)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# ---- the CLI -----------------------------------------------------------------------------------------------------

def load_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_script", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_cli_without_checkpoint_prints_clear_message(tmp_path, capsys):
    script = load_script()
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(SystemExit) as e:
            run_main(script.main, ["--model", str(folder), "--prompt", "hi"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: no checkpoint in") and "weights/README.md" in err
        assert "Traceback" not in err and str(folder) in err


def test_cli_generates_from_meta_folder(tmp_path, capsys, spm_tok, spm_model):
    """End to end through the loader: a Meta-layout folder (params.json + consolidated.00.pth + tokenizer.model)."""
    pytest.importorskip("llama.checkpoint")
    import json
    import shutil

    folder = tmp_path / "ckpt"
    folder.mkdir()
    model, a = spm_model, spm_model.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                  multiple_of=a.multiple_of, norm_eps=a.norm_eps, rope_theta=a.rope_theta)
    (folder / "params.json").write_text(json.dumps(params))
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    shutil.copy(spm_tok.path, folder / "tokenizer.model")
    out = tmp_path / "gen.json"
    script = load_script()
    assert script.main(["--model", str(folder), "--prompt", "the llama", "--temperature", "0", "--max-new-tokens",
                        "5", "--device", "cpu", "--out", str(out)]) == 0
    expected = text_completion(model, spm_tok, ["the llama"], 5, temperature=0.0)[0].text
    assert capsys.readouterr().out == "the llama" + expected + "\n"
    assert json.loads(out.read_text()) == [{"prompt": "the llama", "completion": expected}]
    assert json.loads(out.with_suffix(".config.json").read_text())["max_new_tokens"] == 5
