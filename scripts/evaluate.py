"""Evaluate an SAE: L0, FVU, dead/dense fractions and latent-density histogram on the store's held-out split;
CE-loss recovered (vs zero- and mean-ablation) and delta LM loss with the SAE spliced into the Llama.

    python scripts/evaluate.py --sae runs/sae/sae --store runs/acts --model weights/tiny --text weights/tiny/heldout.txt

Writes SAE_DIR/eval.json and SAE_DIR/eval.txt (or under --out) and prints the table.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.cli import parse_config, run_main  # noqa: E402
from sae.evaluate import EvalConfig, format_table, run_evaluation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EvalConfig, argv, description=__doc__)
    print(format_table(run_evaluation(cfg)))
    return 0


if __name__ == "__main__":
    run_main(main)
