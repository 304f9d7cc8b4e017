"""Capture Llama residual-stream activations into a resumable, memory-mapped activation store.

    python scripts/capture.py                                   # embedded tiny model on its held-out text
    python scripts/capture.py --model weights/Llama-3.2-1B --inputs data/*.jsonl --mode windows --ctx-len 1024 \\
        --points blocks.10.hook_resid_post --out out/activations/llama1b-l10
    torchrun --nproc_per_node 2 scripts/capture.py ...          # each rank takes every 2nd document

Kill it at any moment and rerun the same command: the store ends with exactly the rows of an uninterrupted run.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.cli import parse_config, run_main  # noqa: E402
from sae.activations.capture import CaptureConfig, run_capture  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(CaptureConfig, argv, description=__doc__)
    run_capture(cfg)
    return 0


if __name__ == "__main__":
    run_main(main)
