"""bench/gpu.py --dry-run: every section of the GPU acceptance run executes its code paths at tiny shapes on
CPU (Triton interpreter) and lands in the JSON report (the figures themselves mean nothing on CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_SAE_KERNELS", "LLAMA_SAE_TOPK")}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)  # ~70 s on 2 idle cores
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == ["env", "zero_sync", "sae_train", "kernel_tests", "capture", "kernels_grid", "topk",
                              "auxk_paths", "store", "wgrad", "recovery"]
    assert all(s["status"] == "ok" for s in sections.values()), {k: s["status"] for k, s in sections.items()}
    assert report["card"] == "cpu (dry run)" and report["dry_run"] is True
    assert [row["syncs"] for row in sections["zero_sync"]["rows"]][0] == "none"
    assert sections["zero_sync"]["rows"][0]["aux_width"] > 0  # AuxK was on in the checked steps
    impls = {row["impl"] for row in sections["sae_train"]["rows"]}
    assert impls == {"ours"} and any("sparsify unavailable" in n for n in sections["sae_train"]["notes"])
    assert all(row["n_dead"] > 0 and row["tokens_per_s"] > 0 for row in sections["sae_train"]["rows"])
    assert sections["kernel_tests"]["counts"].get("passed", 0) >= 1
    assert not sections["kernels_grid"]["correctness_failures"]
    assert {row["what"] for row in sections["capture"]["rows"]} == {
        "ours capture (stop_early)", "ours full forward", "HF output_hidden_states"}
    assert sections["capture"]["max_abs_diff_hf_vs_ours"] < 1e-3
    assert len(sections["store"]["rows"]) == 4 and len(sections["auxk_paths"]["rows"]) == 2
    assert len(sections["wgrad"]["rows"]) == 2 and 0 <= sections["recovery"]["rows"][0]["recovery"] <= 1
    assert "card: cpu (dry run)" in r.stdout
