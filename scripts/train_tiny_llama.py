"""Train the embedded tiny Llama from scratch on CPU (corpus -> sentencepiece tokenizer -> model) into weights/tiny.

    python scripts/train_tiny_llama.py                     # the committed model: ~15 min on one CPU thread
    python scripts/train_tiny_llama.py --out /tmp/t --steps 20 --dim 64 --n-layers 2   # a quick smoke run

Every flag is a field of llama.tiny.train.TrainConfig. Deterministic for a given corpus, config and torch build.
Ctrl-C finishes the current step, writes OUT/checkpoint.pt and prints the command that resumes (--resume).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.cli import parse_config, run_main  # noqa: E402
from llama.stop import rerun_command  # noqa: E402
from llama.tiny.train import TrainConfig, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainConfig, argv, description=__doc__)
    res = train(cfg)
    if res.stopped:  # Ctrl-C / SIGTERM: checkpoint written, say how to continue
        print(f"resume with: {rerun_command()}", flush=True)
        return 130 if res.stopped == "SIGINT" else 143
    return 0


if __name__ == "__main__":
    run_main(main)
