"""Automated interpretation of SAE latents: a label, a description and a confidence for every latent with top
contexts, plus a detection score, through an LLM backend (OpenAI-compatible server, Anthropic Messages or Message
Batches, our own Llama offline, or a dry run that only writes the prompts). Resumable: rerun to continue.

    python scripts/interpret.py --analysis runs/analysis --dry-run
    python scripts/interpret.py --analysis runs/analysis --backend llama --model weights/Llama-3.2-1B-Instruct
    OPENAI_API_KEY=... python scripts/interpret.py --analysis runs/analysis --backend openai --model gpt-4o-mini
    python scripts/interpret.py --analysis runs/analysis --backend openai --base-url http://127.0.0.1:8080/v1 --model local
    ANTHROPIC_API_KEY=... python scripts/interpret.py --backend anthropic-batch --model claude-3-5-haiku-latest --save-every 2000
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.cli import parse_config, run_main, save_config  # noqa: E402
from sae.analysis.interpret import InterpretConfig, make_backend, run_interpret  # noqa: E402
from sae.analysis.top_contexts import load_top_contexts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(InterpretConfig, argv, description=__doc__)
    tc = load_top_contexts(cfg.analysis)
    out = Path(cfg.out or cfg.analysis)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "interpret_config.json")  # holds the env var's NAME, never a key
    backend = make_backend(cfg, out)
    table = run_interpret(cfg, tc, backend, out)
    if backend.name == "dry-run":
        print(f"wrote prompts to {out / 'prompts.jsonl'}")
    else:
        scored = [v["detection_score"] for v in table["latents"].values() if v.get("detection_score") is not None]
        mean = f", mean detection score {sum(scored) / len(scored):.3f} over {len(scored)}" if scored else ""
        print(f"{len(table['latents'])} latents labelled, {len(table['errors'])} failed{mean}: {out / 'labels.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
