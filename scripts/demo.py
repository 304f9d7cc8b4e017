"""The main job on the embedded tiny Llama, end to end, in a few minutes on a laptop CPU:

    capture the residual stream -> train a TopK SAE -> evaluate -> top contexts -> HTML dashboard

    python scripts/demo.py                      # weights/tiny on its held-out text, outputs under runs/demo/
    python scripts/demo.py --steps 3000 --k 32  # any stage setting; each stage's exact command is printed

Re-running finds the capture complete (or replaces a store of other settings) and retrains the SAE.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.cli import parse_config, run_main  # noqa: E402
from sae.pipeline import DemoConfig, run_demo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    run_demo(parse_config(DemoConfig, argv, description=__doc__))
    return 0


if __name__ == "__main__":
    run_main(main)
