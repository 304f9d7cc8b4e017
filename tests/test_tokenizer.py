"""Tokenizer and chat format, checked against Meta's own implementation (llama_models/llama3) on its real
tokenizer.model, and against the sentencepiece library for the SentencePiece path."""
from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import pytest

from llama.chat import ChatFormat
from llama.cli import UserError
from llama.tokenizer import (
    SentencePieceTokenizer, TiktokenTokenizer, Tokenizer, split_long_runs,
)
from tests._tokenizer_texts import VARIED_TEXTS

meta_tok_mod = pytest.importorskip("llama_models.llama3.tokenizer")
META_MODEL = Path(meta_tok_mod.__file__).parent / "tokenizer.model"

TEXTS = [
    *VARIED_TEXTS,
    "tabs\tand\t\tnewlines\n\n\nand\r\nwindows\r\n line endings \u00a0nbsp\u2003emspace\u3000",
    " " * 1000 + "x" + "\n" * 500 + "y" + "\t \n" * 300,
    "digits 0 12 123 1234 12345 3.14159265358979 1,000,000 2024-05-01 0x1F ٣٤٥ ١٢٣",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    'for (int i = 0; i < n; ++i) { s += a[i]; }  // C\n<div class="x">&amp;</div>',
    "I'M you'LL they'RE it's we've I'd 'S 'quoted'",
    "special as text: <|begin_of_text|> <|eot_id|><|start_header_id|>user<|end_header_id|> <|reserved_special_token_5|>",
    "<|end_of_text|>",
    "\x00\x01 control chars \x7f and lone surrogate-free text \ufeffBOM",
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Mixed-script fuzz strings: letters, digits, punctuation, whitespace kinds, emoji, special-token fragments."""
    pieces = list("aZé日ß9 \t\n\r.,'!?-_()[]{}<>|") + ["🦙", "👩‍👩‍👧", "<|eot_id|>", "'ll", "  ", "\u00a0", "ǅ", "١"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def meta():
    return meta_tok_mod.Tokenizer(META_MODEL)


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_file(META_MODEL)


def test_detects_tiktoken_and_matches_meta_vocab(meta, ours):
    assert isinstance(ours, TiktokenTokenizer)
    assert ours.special_tokens == meta.special_tokens
    assert (ours.n_words, ours.bos_id, ours.eos_id, ours.pad_id) == (meta.n_words, meta.bos_id, meta.eos_id, meta.pad_id)
    assert ours.stop_tokens == set(meta.stop_tokens)
    # published Llama 3 ids (Meta's model card / prompt-format docs)
    assert (ours.bos_id, ours.eos_id, ours.n_words) == (128000, 128001, 128256)
    assert ours.special_tokens["<|eot_id|>"] == 128009 and ours.special_tokens["<|eom_id|>"] == 128008
    assert sorted(ours.special_tokens.values()) == list(range(128000, 128256))


@pytest.mark.parametrize("bos,eos", [(False, False), (True, False), (True, True)])
def test_encode_decode_parity(meta, ours, bos, eos):
    for s in TEXTS + random_texts(200):
        ids = ours.encode(s, bos=bos, eos=eos)
        assert ids == meta.encode(s, bos=bos, eos=eos), repr(s[:80])
        assert ours.decode(ids) == meta.decode(ids)
        if not bos and not eos:
            assert ours.decode(ids) == s  # byte-level BPE is lossless


def test_special_token_semantics(meta, ours):
    s = "a<|eot_id|>b<|start_header_id|>c"
    plain = ours.encode(s, bos=False, eos=False)
    assert 128009 not in plain and plain == meta.encode(s, bos=False, eos=False)
    for allowed in ("all", {"<|eot_id|>"}):
        got = ours.encode(s, bos=False, eos=False, allowed_special=allowed)
        assert got == meta.encode(s, bos=False, eos=False, allowed_special=allowed)
        assert 128009 in got
    with pytest.raises(ValueError):
        ours.encode(s, bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError):
        meta.encode(s, bos=False, eos=False, disallowed_special="all")


def test_split_long_runs_matches_meta_loop():
    split = meta_tok_mod.Tokenizer._split_whitespaces_or_nonwhitespaces
    rng = random.Random(1)
    for _ in range(300):
        s = "".join(rng.choice("ab \n\t\u3000\u00a0\x1c") * rng.randint(1, 12) for _ in range(rng.randint(0, 15)))
        for max_run in (1, 3, 7):
            assert list(split_long_runs(s, max_run)) == list(split(s, max_run)), (s, max_run)


def test_very_long_inputs(meta, ours):
    """Runs longer than 25k characters and texts longer than the 400k-character chunk are cut where Meta cuts."""
    rng = random.Random(2)
    words = " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 9))) for _ in range(70_000))
    s = "x" * 60_000 + " " * 30_001 + words + "\n" * 26_000 + "🦙" * 30_000
    assert len(s) > 400_000  # two chunks
    ids = ours.encode(s, bos=True, eos=False)
    assert ids == meta.encode(s, bos=True, eos=False)
    assert ours.decode(ids[1:]) == s


CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Réponds en français 🇫🇷"}, {"role": "user", "content": "Bonjour"},
     {"role": "assistant", "content": "Bonjour ! Comment puis-je aider ?"},
     {"role": "user", "content": "Code:\n```python\nprint('hi')\n```\n\n  spaces  "}],
    [{"role": "user", "content": "fake header <|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "call", "eom": True},
     {"role": "tool", "content": "{\"result\": 42}"}],
]


@pytest.mark.parametrize("dialog", CHATS)
def test_chat_format_parity(meta, ours, dialog):
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat

    meta_msgs = [RawMessage(role=m["role"], content=m["content"],
                            stop_reason=StopReason.end_of_message if m.get("eom") else None) for m in dialog]
    expected = MetaChatFormat(meta).encode_dialog_prompt(meta_msgs).tokens
    got = ChatFormat(ours).encode_dialog_prompt(dialog)
    assert got == expected
    assert got[0] == 128000 and got[-1] == ours.encode("\n\n", bos=False, eos=False)[-1]


def test_from_file_folders_and_errors(tmp_path: Path):
    (tmp_path / "a").mkdir()
    shutil.copy(META_MODEL, tmp_path / "a" / "tokenizer.model")
    assert isinstance(Tokenizer.from_file(tmp_path / "a"), TiktokenTokenizer)
    (tmp_path / "hf" / "original").mkdir(parents=True)
    shutil.copy(META_MODEL, tmp_path / "hf" / "original" / "tokenizer.model")
    assert isinstance(Tokenizer.from_file(tmp_path / "hf"), TiktokenTokenizer)

    with pytest.raises(UserError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.model")
    with pytest.raises(UserError, match="no tokenizer.model"):
        Tokenizer.from_file(tmp_path)
    lines = META_MODEL.read_bytes().splitlines(keepends=True)
    bad_cases = {
        "truncated.model": b"".join(lines[:1000]) + lines[1000][:3],  # cut mid-line
        "badb64.model": b"".join(lines[:5]) + b"@@@@ 5\n" + b"".join(lines[6:20]),
        "gap.model": b"".join(lines[:5] + lines[6:20]),  # a missing line: ranks jump
        "garbage.model": bytes(range(256)) * 4,  # neither BPE text nor a protobuf
        "empty.model": b"",
    }
    for name, data in bad_cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as e:
            Tokenizer.from_file(tmp_path / name)
        assert name in str(e.value)


# ---- HF tokenizer.json (what HF-layout folders ship) -------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_json_folder(tmp_path_factory) -> Path:
    """tokenizer.json written by transformers' own tiktoken -> HF converter from Meta's tokenizer.model."""
    conv = pytest.importorskip("transformers.convert_slow_tokenizer")
    from llama.tokenizer import llama3_special_tokens

    folder = tmp_path_factory.mktemp("hf")
    conv.TikTokenConverter(vocab_file=str(META_MODEL), extra_special_tokens=llama3_special_tokens()) \
        .converted().save(str(folder / "tokenizer.json"))
    return folder


def test_hf_tokenizer_json_matches_meta(meta, hf_json_folder: Path):
    tok = Tokenizer.from_file(hf_json_folder)  # the folder has no tokenizer.model: tokenizer.json is used
    assert isinstance(tok, TiktokenTokenizer) and tok.path.name == "tokenizer.json"
    assert tok.special_tokens == meta.special_tokens and tok.n_words == meta.n_words
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_tokens) == \
        (meta.bos_id, meta.eos_id, meta.pad_id, set(meta.stop_tokens))
    for s in TEXTS + random_texts(100, seed=5):
        ids = tok.encode(s, bos=True, eos=False)
        assert ids == meta.encode(s, bos=True, eos=False), repr(s[:80])
        assert tok.decode(ids) == meta.decode(ids)


def test_hf_tokenizer_json_errors(tmp_path: Path):
    import json

    wordpiece = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "pre_tokenizer": None}
    other_pattern = {"model": {"type": "BPE", "vocab": {"a": 0}},
                     "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                         {"type": "Split", "pattern": {"Regex": "\\s+"}}, {"type": "ByteLevel"}]}}
    cases = {"broken": "{not json", "wordpiece": json.dumps(wordpiece), "pattern": json.dumps(other_pattern)}
    for name, text in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(text)
        with pytest.raises(UserError) as e:
            Tokenizer.from_file(tmp_path / name)
        assert str(tmp_path / name / "tokenizer.json") in str(e.value)


# ---- SentencePiece ------------------------------------------------------------------------------------------

CORPUS = """Once upon a time there was a little llama who lived on a hill. Every morning the llama walked
down to the river to drink. The river was cold and clear, and the fish said hello. One day the llama met a fox.
"Where are you going?" asked the fox. "To the river," said the llama, "to drink and to think."
Numbers: 1 2 3 10 20 100 2024. Punctuation! Questions? Quotes "like this" and 'this'.""".splitlines() * 20
CHAT_SYMBOLS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=80,
                                   control_symbols=CHAT_SYMBOLS, minloglevel=2)
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    return folder / "tokenizer.model"


def test_sentencepiece_matches_library(spm_file: Path):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(spm_file))
    tok = Tokenizer.from_file(spm_file.parent)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (ref.bos_id(), ref.eos_id(), ref.pad_id(), 80)
    eot = ref.piece_to_id("<|eot_id|>")
    assert tok.special_tokens["<|eot_id|>"] == eot and tok.stop_tokens == {ref.eos_id(), eot}
    for s in ["the llama went to the river", "Hello, fox! 123", "unseen Zebra ∑", "a <|eot_id|> b", ""]:
        assert tok.encode(s, bos=True, eos=True) == [ref.bos_id()] + ref.encode(s) + [ref.eos_id()]
        assert tok.decode(tok.encode(s, bos=False, eos=False)) == ref.decode(ref.encode(s))
    # special strings are plain text by default, real control ids when allowed
    assert eot not in tok.encode("a <|eot_id|> b", bos=False, eos=False)
    assert tok.encode("a<|eot_id|>b", bos=False, eos=False, allowed_special="all") == \
        ref.encode("a") + [eot] + ref.encode("b")
    with pytest.raises(ValueError):
        tok.encode("a<|eot_id|>b", bos=False, eos=False, disallowed_special="all")


def test_sentencepiece_chat_format(spm_file: Path):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(spm_file))
    tok = Tokenizer.from_file(spm_file)
    sid = {s: ref.piece_to_id(s) for s in CHAT_SYMBOLS}
    header = lambda role: [sid["<|start_header_id|>"]] + ref.encode(role) + [sid["<|end_header_id|>"]] + ref.encode("\n\n")
    expected = ([ref.bos_id()] + header("user") + ref.encode("hi llama") + [sid["<|eot_id|>"]] + header("assistant"))
    assert ChatFormat(tok).encode_dialog_prompt([{"role": "user", "content": "hi llama"}]) == expected


def test_chat_format_needs_chat_tokens(tmp_path: Path):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=70, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(UserError, match="chat special tokens"):
        ChatFormat(Tokenizer.from_file(tmp_path))
    with pytest.raises(UserError, match="role"):
        ChatFormat(Tokenizer.from_file(META_MODEL)).encode_dialog_prompt([{"role": "robot", "content": "x"}])
