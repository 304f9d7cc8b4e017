"""Top-activating contexts for EVERY latent of an SAE (max token / sentence mean / last token), firing frequency,
activation histograms and promoted/suppressed tokens, written as the files described in sae/analysis/README.md.

    python scripts/top_contexts.py --sae runs/sae/sae --store out/activations/tiny --out runs/analysis
    python scripts/top_contexts.py --sae runs/sae/sae --text data.txt --model weights/tiny --out runs/analysis
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.cli import parse_config, run_main  # noqa: E402
from sae.analysis.run import run_top_contexts  # noqa: E402
from sae.analysis.top_contexts import TopContextsConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TopContextsConfig, argv, description=__doc__)
    out = run_top_contexts(cfg)
    print(f"wrote top contexts to {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
