"""Tokenizers behind one interface: Llama 3's tiktoken BPE and SentencePiece (the embedded tiny model uses one).

    tok = Tokenizer.from_file("weights/Llama-3.2-1B")     # a folder holding tokenizer.model, or the file itself
    ids = tok.encode("Hello world", bos=True, eos=False)   # [128000, 9906, 1917]
    tok.decode(ids)                                        # '<|begin_of_text|>Hello world'

Llama 3's tokenizer.model is a text file, one `base64(token bytes) rank` per line (128,000 lines); the 256 special
tokens follow the base vocabulary (ids 128000..128255) in Meta's fixed order. A SentencePiece model is a binary
protobuf; `from_file` tells them apart by content, not by name (both are called tokenizer.model).

As in Meta's reference, text that *looks like* a special token ("<|eot_id|>") is encoded as plain text unless the
caller lists it in `allowed_special`; `disallowed_special` names the ones that raise instead.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import AbstractSet, Collection, Iterator, Literal, Sequence

from llama.cli import UserError, repo_path

SpecialSet = Literal["all"] | AbstractSet[str]
SpecialCollection = Literal["all"] | Collection[str]

# Meta's split pattern for Llama 3 (llama_models/llama3/tokenizer.py): contractions, letter runs with one optional
# leading non-letter, 1-3 digit groups, punctuation runs, newlines, and whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The first 12 special tokens, in id order from 128000; the rest of the 256 are <|reserved_special_token_{2+i}|>.
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
NUM_SPECIAL_TOKENS = 256
STOP_TOKEN_NAMES = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
# tiktoken panics on very long inputs (openai/tiktoken#195): encode in 400k-char chunks, and cut any run of
# >25k consecutive whitespace or non-whitespace characters, exactly where Meta's reference cuts it.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def llama3_special_tokens() -> list[str]:
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIALS))]
    return LLAMA3_NAMED_SPECIALS + reserved


def split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut `s` so no piece holds more than `max_run` consecutive whitespace (or non-whitespace) characters.

    A run of length L starting at p is cut at p + max_run, p + 2*max_run, ...; pieces otherwise stay mixed.
    Same cut points as Meta's per-character loop, found with a regex (`\\s` is str.isspace for str patterns).
    """
    if len(s) <= max_run:  # nothing to cut (most calls: a sentence, a document)
        yield s
        return
    start = 0
    for m in re.finditer(r"\s+|\S+", s):
        for cut in range(m.start() + max_run, m.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


class Tokenizer(ABC):
    """The interface every tokenizer offers; `Tokenizer.from_file(path)` picks the implementation."""

    special_tokens: dict[str, int]  # special-token string -> id
    bos_id: int
    eos_id: int
    pad_id: int  # -1 when the vocabulary has none
    n_words: int  # vocabulary size, special tokens included
    path: Path  # the file it was loaded from

    @property
    def stop_tokens(self) -> set[int]:
        """Ids that end a generation: end_of_text (or the eos), eom and eot where the vocabulary has them."""
        ids = {self.eos_id} | {self.special_tokens[n] for n in STOP_TOKEN_NAMES if n in self.special_tokens}
        return {i for i in ids if i >= 0}

    @abstractmethod
    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special: SpecialSet | None = None,
               disallowed_special: SpecialCollection = ()) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @staticmethod
    def from_file(path: str | Path) -> "Tokenizer":
        """Load `path`: a tokenizer.model file (tiktoken BPE text or SentencePiece), an HF tokenizer.json of a
        Llama 3 tokenizer, a GGUF model file (its tokenizer metadata: llama/tokenizer_gguf.py), or a folder holding
        one of them (tokenizer.model, original/tokenizer.model, tokenizer.json, a single *.gguf)."""
        file = find_tokenizer_file(path)
        if file.suffix.lower() == ".gguf" or _starts_with(file, b"GGUF"):
            from llama.tokenizer_gguf import GGUFTokenizer
            return GGUFTokenizer(file)
        if file.suffix == ".json":
            return TiktokenTokenizer(file)
        try:
            with open(file, "rb") as fh:
                head = fh.read(4096)
        except OSError as e:
            raise UserError(f"{file}: cannot read tokenizer file ({e})") from e
        if not head.strip():
            raise UserError(f"{file}: empty tokenizer file (expected a tiktoken BPE file or a SentencePiece model)")
        if _looks_like_bpe_text(head):
            return TiktokenTokenizer(file)
        return SentencePieceTokenizer(file)


def find_tokenizer_file(path: str | Path) -> Path:
    p = repo_path(path)  # "weights/tiny" from any folder
    if p.is_dir():
        for cand in (p / "tokenizer.model", p / "original" / "tokenizer.model", p / "tokenizer.json"):
            if cand.is_file():
                return cand
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:  # a folder holding one GGUF model: its tokenizer is in the file's metadata
            return ggufs[0]
        if ggufs:
            raise UserError(f"{p}: several GGUF files in this folder ({', '.join(g.name for g in ggufs)}); "
                            "pass the one you mean")
        raise UserError(f"{p}: no tokenizer.model in this folder (nor original/tokenizer.model, nor tokenizer.json); "
                        "expected a Llama 3 tiktoken BPE file or a SentencePiece model named tokenizer.model")
    if not p.is_file():
        raise UserError(f"{p}: tokenizer file not found (expected a tokenizer.model, tokenizer.json or .gguf file, or a "
                        "folder holding one)")
    return p


def _starts_with(file: Path, magic: bytes) -> bool:
    try:
        with open(file, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def _looks_like_bpe_text(head: bytes) -> bool:
    """True when the file starts like `base64 rank` lines (a SentencePiece protobuf starts with binary bytes)."""
    try:
        first = head.decode("ascii").splitlines()[0].split()
    except (UnicodeDecodeError, IndexError):
        return False
    return len(first) == 2 and first[1].isdigit() and re.fullmatch(r"[A-Za-z0-9+/=]+", first[0]) is not None


def load_bpe_ranks(file: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file strictly: every line `base64 rank`, ranks exactly 0..n-1 (a truncated or edited
    file fails here with the line number, where Meta's loader would skip the line with a warning)."""
    try:
        text = file.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not a tiktoken BPE file (expected ASCII lines 'base64 rank'): {e}") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected two fields")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise UserError(f"{file}:{lineno}: corrupt tiktoken BPE line {line[:60]!r} "
                            f"(expected 'base64 rank'): {e}") from e
        if token in ranks or rank != len(ranks):
            raise UserError(f"{file}:{lineno}: rank {rank} out of order or duplicated token (expected rank "
                            f"{len(ranks)}); the file is truncated or corrupt")
        ranks[token] = rank
    if not ranks:
        raise UserError(f"{file}: empty tokenizer file")
    return ranks


def load_hf_tokenizer_json(file: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Ranks and special tokens from an HF tokenizer.json of a Llama 3 tokenizer (HF folders often ship only this).
    Its byte-level BPE vocabulary was converted from tiktoken: a token's id is its merge rank, and its string spells
    the token's bytes through GPT-2's byte -> printable-character table."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        model, added = data["model"], data.get("added_tokens") or []
        pre = json.dumps(data.get("pre_tokenizer"))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{file}: not a readable HF tokenizer.json ({type(e).__name__}: {e})") from e
    if model.get("type") != "BPE" or json.dumps(LLAMA3_PATTERN) not in pre or "ByteLevel" not in pre:
        raise UserError(f"{file}: not a Llama 3 tokenizer (expected a byte-level BPE model with Llama 3's split "
                        "pattern); use the checkpoint's original/tokenizer.model instead")
    specials = {t["content"]: int(t["id"]) for t in added}
    byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
    try:
        pairs = sorted((int(i), bytes(byte_of[c] for c in tok)) for tok, i in model["vocab"].items()
                       if tok not in specials)
    except KeyError as e:
        raise UserError(f"{file}: vocabulary entry with a character outside the byte-level alphabet: {e}") from e
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise UserError(f"{file}: vocabulary ids are not 0..{len(pairs) - 1} (not a tiktoken-converted tokenizer)")
    return {b: i for i, b in pairs}, specials


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


class TiktokenTokenizer(Tokenizer):
    """Llama 3 BPE on tiktoken; ids, special tokens and encode/decode identical to Meta's reference."""

    def __init__(self, file: str | Path):
        import tiktoken

        self.path = file = Path(file)
        if file.suffix == ".json":  # HF tokenizer.json: the special tokens are named by the file
            ranks, self.special_tokens = load_hf_tokenizer_json(file)
        else:  # Meta's tokenizer.model: 256 special tokens after the base vocabulary, in Meta's order
            ranks = load_bpe_ranks(file)
            self.special_tokens = {t: len(ranks) + i for i, t in enumerate(llama3_special_tokens())}
        for name in ("<|begin_of_text|>", "<|end_of_text|>"):
            if name not in self.special_tokens:
                raise UserError(f"{file}: no {name} special token (not a Llama 3 tokenizer)")
        self.model = tiktoken.Encoding(name=file.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = max(len(ranks), max(self.special_tokens.values()) + 1)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens.get("<|finetune_right_pad_id|>", -1)

    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special: SpecialSet | None = None,
               disallowed_special: SpecialCollection = ()) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        allowed = set() if allowed_special is None else allowed_special
        ids = [self.bos_id] if bos else []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(s[i:i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=disallowed_special))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode([int(i) for i in ids])


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model behind the same interface. Its control pieces act as special tokens (so a model trained
    with <|start_header_id|>, <|end_header_id|>, <|eot_id|> as control symbols can chat); decode drops them."""

    def __init__(self, file: str | Path):
        import sentencepiece as spm

        self.path = file = Path(file)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(file))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{file}: neither a tiktoken BPE file nor a valid SentencePiece model ({e})") from e
        n = self.sp.GetPieceSize()
        self.special_tokens = {self.sp.IdToPiece(i): i for i in range(n)
                               if self.sp.IsControl(i)}
        self.n_words = n
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special: SpecialSet | None = None,
               disallowed_special: SpecialCollection = ()) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special or ())
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        for tok in disallowed:
            if tok in s:
                raise ValueError(f"encountered text corresponding to disallowed special token {tok!r}")
        ids = [self.bos_id] if bos else []
        if allowed:  # cut the text at allowed special strings; everything between is ordinary text
            pattern = "(" + "|".join(re.escape(t) for t in sorted(allowed, key=len, reverse=True)) + ")"
            for part in re.split(pattern, s):
                if part in allowed:
                    ids.append(self.special_tokens[part])
                elif part:
                    ids.extend(self.sp.EncodeAsIds(part))
        else:
            ids.extend(self.sp.EncodeAsIds(s))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])
