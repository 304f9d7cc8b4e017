"""The key-value metadata of a GGUF file, read fast and strictly (tensor data and tensor infos are not touched).

    meta = read_gguf_metadata("model.gguf", prefixes=("general.", "tokenizer."))
    meta["tokenizer.ggml.tokens"][:3]       # ['<|endoftext|>', '<|im_start|>', '<|im_end|>']

GGUF layout (ggml's docs/gguf.md): magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 key count, then
per key: string key, u32 value type, value. A string is u64 length + UTF-8 bytes; an array is u32 element type +
u64 count + elements. Numeric arrays come back as numpy arrays, string arrays as lists of str.

`gguf.GGUFReader` reads the same values but builds a numpy view per string: 2.7 s for SmolLM2's 98k-string
vocabulary on our CPU, against ~0.1 s here, and every script that loads the tokenizer pays it.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llama.cli import UserError

# The format's constants (gguf.GGUF_MAGIC, gguf.GGUFValueType; tests check they agree), spelled out here because
# `import gguf` alone costs 0.35 s, three times the read.
GGUF_MAGIC = 0x46554747  # b"GGUF" read as a little-endian u32
STRING, ARRAY = 8, 9
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Cursor:
    """Reads values from a buffer, moving forward; every read past the end is a truncated file."""

    def __init__(self, buf: Any, order: str, path: Path):
        self.buf, self.order, self.path, self.off = buf, order, path, 0
        self.structs = {f: struct.Struct(order + f) for f in SCALAR_FORMATS.values()}

    def scalar(self, fmt: str) -> Any:
        st = self.structs[fmt]
        if self.off + st.size > len(self.buf):
            raise UserError(f"{self.path}: truncated GGUF file (metadata ends at byte {len(self.buf)})")
        (v,) = st.unpack_from(self.buf, self.off)
        self.off += st.size
        return v

    def string(self, decode: bool = True) -> str | None:
        n = self.scalar("Q")
        end = self.off + n
        if end > len(self.buf):
            raise UserError(f"{self.path}: truncated GGUF file (a string runs past the end of the file)")
        raw, self.off = self.buf[self.off:end], end
        if not decode:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: a GGUF metadata string is not UTF-8 ({e})") from e

    def value(self, vtype: int, decode: bool) -> Any:
        if vtype == STRING:
            return self.string(decode)
        if vtype in SCALAR_FORMATS:
            return self.scalar(SCALAR_FORMATS[vtype])
        if vtype != ARRAY:
            raise UserError(f"{self.path}: unknown GGUF metadata value type {vtype} (a corrupt or newer file)")
        etype, count = self.scalar("I"), self.scalar("Q")
        if etype in SCALAR_FORMATS:  # a numeric array: one numpy view, copied out of the mapping
            dtype = np.dtype(self.order + SCALAR_FORMATS[etype])
            end = self.off + count * dtype.itemsize
            if end > len(self.buf):
                raise UserError(f"{self.path}: truncated GGUF file (an array runs past the end of the file)")
            arr = np.frombuffer(self.buf, dtype, count, self.off).copy() if decode else None
            self.off = end
            return arr
        if etype == STRING:
            return self.strings(count, decode)
        return [self.value(etype, decode) for _ in range(count)]

    def strings(self, count: int, decode: bool) -> list[str] | None:
        """A string array (a vocabulary: ~100k strings), in one tight loop."""
        buf, off, unpack, size = self.buf, self.off, self.structs["Q"].unpack_from, len(self.buf)
        out = []
        try:
            for _ in range(count):
                (n,) = unpack(buf, off)
                off += 8 + n
                if decode:
                    out.append(buf[off - n:off].decode("utf-8"))
        except struct.error:
            off = size + 1
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: a GGUF metadata string is not UTF-8 ({e})") from e
        if off > size:
            raise UserError(f"{self.path}: truncated GGUF file (a string array runs past the end of the file)")
        self.off = off
        return out if decode else None


def read_gguf_metadata(path: str | Path, prefixes: Sequence[str] = ("",)) -> dict[str, Any]:
    """Every metadata key starting with one of `prefixes`, with its value. Not a GGUF file, a version other
    than 2/3, or a file cut short -> UserError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            if size < 24:
                raise UserError(f"{path}: not a GGUF file ({size} bytes; a GGUF file starts with 'GGUF' and a "
                                "24-byte header)")
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise UserError(f"{path}: cannot read GGUF file ({e})") from e
    try:
        if struct.unpack_from("<I", buf, 0)[0] != GGUF_MAGIC:
            raise UserError(f"{path}: not a GGUF file (it starts with {bytes(buf[:4])!r}, expected b'GGUF')")
        version = struct.unpack_from("<I", buf, 4)[0]
        order = "<"
        if version not in (2, 3) and struct.unpack_from(">I", buf, 4)[0] in (2, 3):
            order = ">"  # a big-endian GGUF (s390x builds of llama.cpp write these)
        elif version not in (2, 3):
            raise UserError(f"{path}: GGUF version {version} is not supported (expected 2 or 3; re-convert the model "
                            "with a recent llama.cpp)")
        cur = _Cursor(buf, order, path)
        cur.off = 8
        cur.scalar("Q")  # tensor count
        n_kv = cur.scalar("Q")
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            assert key is not None
            wanted = key.startswith(tuple(prefixes))
            out_value = cur.value(cur.scalar("I"), decode=wanted)
            if wanted:
                out[key] = out_value
        return out
    finally:
        buf.close()
