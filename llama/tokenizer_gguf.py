"""The tokenizer stored in a GGUF file (llama.cpp's `tokenizer.ggml.*` metadata), rebuilt on tiktoken.

    tok = Tokenizer.from_file("SmolLM2-135M-Instruct.Q4_1.gguf")   # dispatches here for a GGUF file
    tok.encode("Hello 2024", bos=False, eos=False)                 # the ids HF `tokenizers` gives
    tok.decode(ids)

Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE) with `tokenizer.ggml.pre` one of PRE_TOKENIZERS
(`llama-bpe` for Llama 3, `smollm`, `gpt2`, and their llama.cpp aliases).

How the file's vocabulary becomes tiktoken's mergeable ranks:
- Normal tokens are spelled in GPT-2's byte -> printable-character table; their bytes are the tiktoken tokens,
  their ids the ranks. Control tokens (type 3, and 2 "unknown") are special tokens: encoded from text only when
  the caller allows them (`allowed_special`), else their text is ordinary text, as in the Llama 3 tokenizer.
  User-defined tokens (type 4) are matched whole in any text, as llama.cpp and HF do.
- tiktoken merges the adjacent pair whose *concatenation* has the lowest rank; HF and llama.cpp merge the pair
  with the lowest *merge* rank. With rank = id (ids follow merge order, checked) the two agree on every text
  when every ranked token is reachable, i.e. HF's merges applied to its own bytes end in that token: were
  tiktoken ever to join an adjacent pair (x, y) that is not a merge, with x + y = t, then HF's merges restricted
  to t's span (no token crosses it) are HF's merges of t alone, which stop at [x, y], so t is unreachable.
  Unreachable tokens (and tokens no merge makes) are never produced by HF, so they are left out of the ranks and
  kept for decoding only. tiktoken also returns a whole pre-token that is itself a token without merging; for a
  reachable token that is what the merges give too. `llama-bpe` vocabularies come from tiktoken (Llama 3):
  there the ids are tiktoken's ranks as they are and the merges are not needed (llama.cpp's `ignore_merges`).
- A byte missing from the vocabulary (SmolLM2 lacks 0x04, 0x06, 0x13, ...) is dropped, as HF's BPE does when
  there is no unknown token; text holding one takes a slower path (Python pre-tokenizer, then tiktoken per piece).
- Runs of over 100,000 whitespace (or non-whitespace) characters are cut first (tiktoken's regex engine
  overflows its stack near 1M); HF does not cut, so only such runs may tokenize differently.

BOS: `encode(text, bos=True)` prepends `tok.bos_id`. For a file whose `tokenizer.ggml.add_bos_token` is true
(Llama 3) that is the file's BOS. A model that adds no BOS of its own (SmolLM2: add_bos false, and the file's
"bos" <|im_start|> opens a chat turn) gets <|endoftext|>, the separator its pretraining documents were packed
with (SmolLM2's base model calls it BOS): what a capture, an evaluation or a plain-text prompt should start with.
Measured on SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized into HF's LlamaForCausalLM, fp32): mean NLL of
tokens 2..128 of 40 held-out CPython-doc paragraphs is 3.130 after <|endoftext|>, 3.213 with no start token and
3.238 after <|im_start|>. `bos=False` gives exactly the ids of HF's (and llama.cpp's) tokenizer for the model.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from llama.cli import UserError
from llama.gguf_metadata import read_gguf_metadata
from llama.tokenizer import (
    LLAMA3_PATTERN, STOP_TOKEN_NAMES, SpecialCollection, SpecialSet, Tokenizer, _bytes_to_unicode, split_long_runs,
)

# GPT-2's split pattern (HF ByteLevel's use_regex): contractions, letter runs, digit runs and punctuation runs with
# one optional leading space, whitespace not followed by a non-space, and whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM / StarCoder (HF: Digits(individual_digits) then ByteLevel; llama.cpp: "\p{N}" then GPT-2's pattern) as
# one pattern: every digit is its own piece, and GPT-2's pattern runs on the text between digits, so a digit ends
# a whitespace run like the end of the text does (hence (?![^\s\p{N}]) where GPT-2 has (?!\S)).
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


class PreTokenizer(NamedTuple):
    pattern: str
    ignore_merges: bool  # True: ranks are the ids as they are (tiktoken-trained vocabularies)
    add_bos: bool  # llama.cpp's default when the file does not say


PRE_TOKENIZERS = {
    "llama-bpe": PreTokenizer(LLAMA3_PATTERN, True, True),
    "llama3": PreTokenizer(LLAMA3_PATTERN, True, True),
    "llama-v3": PreTokenizer(LLAMA3_PATTERN, True, True),
    "smollm": PreTokenizer(SMOLLM_PATTERN, False, False),
    "starcoder": PreTokenizer(SMOLLM_PATTERN, False, False),
    "gpt2": PreTokenizer(GPT2_PATTERN, False, False),
    "gpt-2": PreTokenizer(GPT2_PATTERN, False, False),
}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType
GGUF_STOP_TOKEN_NAMES = (*STOP_TOKEN_NAMES, "<|im_end|>", "<|endoftext|>")
MAX_RUN_CHARS = 100_000
NEVER_IN_UTF8 = frozenset({0xC0, 0xC1, *range(0xF5, 0x100)})  # bytes no str ever encodes to


class Vocab(NamedTuple):
    ranks: dict[bytes, int]  # tiktoken's mergeable ranks (= token ids)
    specials: dict[str, int]  # control tokens
    user_defined: dict[str, int]  # always matched whole
    token_bytes: list[bytes]  # id -> bytes, for decoding (every id)
    missing: bytes  # bytes no token spells and text can hold: dropped


def build_vocab(meta: dict, path: Path, pre: PreTokenizer) -> Vocab:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type")
    types = np.full(len(tokens), NORMAL) if types is None else np.asarray(types)
    if len(types) != len(tokens):
        raise UserError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    b2u = _bytes_to_unicode()
    to_bytes = str.maketrans({ch: chr(b) for b, ch in b2u.items()})
    outside = re.compile("[^" + re.escape("".join(b2u.values())) + "]")
    token_bytes, normal, specials, user_defined = [], {}, {}, {}
    for i, (tok, kind) in enumerate(zip(tokens, types.tolist())):
        if kind in (NORMAL, BYTE) and not outside.search(tok):  # spelled in the byte alphabet
            b = tok.translate(to_bytes).encode("latin-1")
            normal.setdefault(b, i)
        else:  # control / user-defined / unused, or a normal token spelled as plain text (as HF reads it)
            b = tok.encode("utf-8")
            if kind in (NORMAL, BYTE):
                normal.setdefault(b, i)
            elif kind in (CONTROL, UNKNOWN) and tok:
                specials.setdefault(tok, i)
            elif kind == USER_DEFINED and tok:
                user_defined.setdefault(tok, i)
        token_bytes.append(b)
    ranks = normal if pre.ignore_merges else merge_ranks(meta, path, tokens, normal, token_bytes)
    have = {b[0] for b in ranks if len(b) == 1}
    missing = bytes(sorted(set(range(256)) - have - NEVER_IN_UTF8))
    return Vocab(ranks, specials, user_defined, token_bytes, missing)


def merge_ranks(meta: dict, path: Path, tokens: list[str], normal: dict[bytes, int],
                token_bytes: list[bytes]) -> dict[bytes, int]:
    """Single bytes + the tokens the merges make and reach, ranked by id; checks ids follow the merge order."""
    merges = meta.get("tokenizer.ggml.merges") or []
    if not merges and any(len(b) > 1 for b in normal):
        raise UserError(f"{path}: no tokenizer.ggml.merges (a byte-level BPE vocabulary needs its merges)")
    tid = {t: i for i, t in enumerate(tokens)}
    n = len(tokens)
    made: dict[int, int] = {}  # left * n + right -> the id it makes (ids follow merge order: the id is the rank)
    split: dict[int, tuple[int, int]] = {}  # id -> the first merge that makes it
    last = -1
    for r, m in enumerate(merges):
        a, sep, b = m.partition(" ")
        ia, ib, it = tid.get(a), tid.get(b), tid.get(a + b)
        if not sep or ia is None or ib is None or it is None:
            raise UserError(f"{path}: merge {r} {m!r} is not 'left right' of two tokens making a third")
        made.setdefault(ia * n + ib, it)
        if it not in split:
            if it <= last:
                raise UserError(f"{path}: token ids do not follow the merge order (merge {r} {m!r} makes id {it} "
                                f"after id {last}); such vocabularies are not supported")
            split[it], last = (ia, ib), it
    ranks = {b: i for b, i in normal.items() if len(b) == 1}
    for it, (ia, ib) in split.items():
        if reaches(tokens[it], tid, made, n) == it:
            ranks[token_bytes[it]] = it
    return ranks


def reaches(word: str, tid: dict[str, int], made: dict[int, int], n: int) -> int:
    """HF's BPE on one pre-token: merge the adjacent pair that makes the lowest id (= lowest merge rank; leftmost
    on ties) until none is left. Returns the one token it ends in, or -1 when it ends in several."""
    parts = [tid.get(ch, -1) for ch in word]
    while len(parts) > 1:
        best, at = n, -1
        for j in range(len(parts) - 1):
            r = made.get(parts[j] * n + parts[j + 1], n)
            if r < best:
                best, at = r, j
        if at < 0:
            return -1
        parts[at:at + 2] = [best]
    return parts[0]


class GGUFTokenizer(Tokenizer):
    """Byte-level BPE from a GGUF file's metadata; ids equal HF `tokenizers` (and llama.cpp) for the model."""

    def __init__(self, file: str | Path):
        import tiktoken

        self.path = file = Path(file)
        meta = read_gguf_metadata(file, ("general.architecture", "tokenizer."))
        model = meta.get("tokenizer.ggml.model")
        if model is None or "tokenizer.ggml.tokens" not in meta:
            raise UserError(f"{file}: no tokenizer in this GGUF file (no tokenizer.ggml.model / tokens metadata); "
                            "pass --tokenizer with the model's tokenizer file")
        if model != "gpt2":
            kind = {"llama": "a SentencePiece vocabulary"}.get(model, "an unsupported vocabulary type")
            raise UserError(f"{file}: tokenizer.ggml.model = {model!r} ({kind}); supported: 'gpt2' (byte-level "
                            "BPE: Llama 3, SmolLM2, GPT-2)")
        pre_name = meta.get("tokenizer.ggml.pre")
        if pre_name not in PRE_TOKENIZERS:
            raise UserError(f"{file}: tokenizer.ggml.pre = {pre_name!r} is not a supported pre-tokenizer (supported: "
                            f"{', '.join(sorted(PRE_TOKENIZERS))})")
        pre = PRE_TOKENIZERS[pre_name]
        v = build_vocab(meta, file, pre)
        self.pre_tokenizer, self.pattern = pre_name, pre.pattern
        self.special_tokens = v.specials  # control tokens only: the ones `allowed_special` governs
        self.user_defined = v.user_defined
        self._always = frozenset(v.user_defined)  # allowed in every encode
        self.token_bytes, self.missing = v.token_bytes, v.missing
        self.model = tiktoken.Encoding(name=file.name, pat_str=pre.pattern, mergeable_ranks=v.ranks,
                                       special_tokens={**v.user_defined, **v.specials})
        self.n_words = len(v.token_bytes)
        self.chat_template: str | None = meta.get("tokenizer.chat_template")
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre.add_bos))
        ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id", -1) for k in ("bos", "eos", "padding", "eot", "eom")}
        for k, i in ids.items():
            if not -1 <= int(i) < self.n_words:
                raise UserError(f"{file}: tokenizer.ggml.{k}_token_id = {i} is not a token id (0..{self.n_words - 1})")
        self.file_bos_id = int(ids["bos"])
        self.eos_id = int(ids["eos"]) if ids["eos"] >= 0 else self.special_tokens.get("<|endoftext|>", -1)
        if self.add_bos and self.file_bos_id >= 0:
            self.bos_id = self.file_bos_id
        else:  # no BOS of its own: start text after the document separator (see the module docstring)
            self.bos_id = self.special_tokens.get("<|endoftext|>", self.file_bos_id if self.file_bos_id >= 0
                                                  else self.eos_id)
        if self.bos_id < 0 or self.eos_id < 0:
            raise UserError(f"{file}: the tokenizer names no BOS/EOS token (tokenizer.ggml.bos_token_id / "
                            "eos_token_id) and has no <|endoftext|>")
        self.pad_id = int(ids["padding"])
        self._extra_stops = {int(ids["eot"]), int(ids["eom"])} - {-1}

    @property
    def stop_tokens(self) -> set[int]:
        """eos, the file's eot/eom ids, and <|end_of_text|>, <|eom_id|>, <|eot_id|>, <|im_end|>, <|endoftext|>."""
        names = {self.special_tokens[n] for n in GGUF_STOP_TOKEN_NAMES if n in self.special_tokens}
        return {self.eos_id} | self._extra_stops | names

    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special: SpecialSet | None = None,
               disallowed_special: SpecialCollection = ()) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        allowed = self._always if not allowed_special else self._always | (
            frozenset(self.special_tokens) if allowed_special == "all" else frozenset(allowed_special))
        ids = [self.bos_id] if bos else []
        if self.missing and len(b := s.encode("utf-8", "surrogatepass")) != len(b.translate(None, self.missing)):
            ids.extend(self._encode_dropping(s, allowed, disallowed_special))
        else:
            for piece in split_long_runs(s, MAX_RUN_CHARS):
                ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=disallowed_special))
        if eos:
            ids.append(self.eos_id)
        return ids

    def _encode_dropping(self, s: str, allowed: frozenset[str], disallowed_special: SpecialCollection) -> list[int]:
        """Text holding bytes the vocabulary lacks: pre-tokenize in Python, drop those bytes from each piece (as
        HF's BPE drops symbols it has no token for), then tiktoken's BPE per piece."""
        import regex  # tiktoken's own dependency

        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        for tok in disallowed:
            if tok in s:
                raise ValueError(f"encountered text corresponding to disallowed special token {tok!r}")
        specials = {**self.user_defined, **self.special_tokens}
        parts = re.split("(" + "|".join(map(re.escape, sorted(allowed, key=len, reverse=True))) + ")", s) \
            if allowed else [s]
        split, ids = regex.compile(self.pattern), []
        for part in parts:
            if part in allowed:
                ids.append(specials[part])
                continue
            for piece in split.findall(part):
                b = piece.encode("utf-8", "surrogatepass").translate(None, self.missing)
                if b:
                    ids.extend(self.model._encode_single_piece(b))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        try:  # tiktoken knows every ranked and special id ...
            data = self.model.decode_bytes(ids)
        except (KeyError, OverflowError):  # ... the rest (unreachable, unused tokens) only the table has
            bad = [i for i in ids if not 0 <= i < self.n_words]
            if bad:
                raise ValueError(f"token id {bad[0]} is out of range for this vocabulary (0..{self.n_words - 1})")
            data = b"".join([self.token_bytes[i] for i in ids])
        return data.decode("utf-8", "replace")
