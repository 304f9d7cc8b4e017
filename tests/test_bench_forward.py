"""bench/llama_forward.py end to end at tiny shapes: both children run, and both count the same weights."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import llama

ROOT = Path(__file__).resolve().parents[1]


def test_forward_bench_runs_and_compares_like_with_like(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from llama_forward import write_random_checkpoint
    finally:
        sys.path.remove(str(ROOT / "bench"))
    args = llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                           use_scaled_rope=True, rope_factor=32.0, tie_embeddings=True)
    write_random_checkpoint(tmp_path / "ckpt", args)
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "llama_forward.py"), "--folder", str(tmp_path / "ckpt"),
                        "--prompt", "12", "--new-tokens", "3", "--rounds", "1", "--prefills", "2", "--threads", "1",
                        "--dtypes", "bfloat16", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ratio ours/HF: prefill time" in r.stdout and "prefill profile" in r.stdout
    res = json.loads(out.read_text())["results"]["bfloat16"]
    ours, hf = res["ours"], res["hf"]
    assert ours["weights_gb"] == pytest.approx(hf["weights_gb"], rel=1e-9)  # packed weights counted, tied once
    for m in (ours, hf):
        assert m["prefill_s"] > 0 and m["decode_tok_s"] > 0 and 0 < m["prefill_gemm_s"] <= m["prefill_profiled_s"]
        assert m["gemm_gflops"] > 0 and m["matmul_gflops"] > 0
