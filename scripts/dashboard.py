"""Build the static HTML dashboard of an SAE (open OUT/index.html in a browser; no server needed).

    python scripts/dashboard.py --analysis runs/analysis --out runs/dashboard
    python scripts/dashboard.py --analysis runs/analysis --sae runs/sae/sae --metrics runs/sae/metrics.jsonl
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.cli import parse_config, run_main  # noqa: E402
from sae.analysis.dashboard import DashboardConfig, build_dashboard  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DashboardConfig, argv, description=__doc__)
    index = build_dashboard(cfg)
    print(f"dashboard: {index.resolve().as_uri()}")
    return 0


if __name__ == "__main__":
    run_main(main)
