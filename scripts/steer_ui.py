"""Local web UI for steering (standard library server on 127.0.0.1): steered vs unsteered, side by side, streaming.

    python scripts/steer_ui.py --sae runs/sae/sae --labels runs/analysis/labels.json      # the embedded tiny model
    python scripts/steer_ui.py --model weights/Llama-3.2-1B-Instruct --sae runs/sae1b/sae --port 8765
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama.cli import UserError, parse_config, run_main  # noqa: E402


@dataclass
class SteerUIConfig:
    sae: str = field(default="", metadata={"help": "SAE folder (cfg.json + sae_weights.safetensors)"})
    model: str = field(default="weights/tiny", metadata={"help": "model the SAE was trained on (folder, .gguf "
                                                                 "file, or a name: smollm2)"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer file or folder (default: --model)"})
    labels: str = field(default="", metadata={"help": "labels.json from scripts/interpret.py (latent search by label)"})
    host: str = field(default="127.0.0.1", metadata={"help": "loopback address to bind"})
    port: int = field(default=8765, metadata={"help": "TCP port (0: any free port)"})
    max_new_tokens: int = field(default=256, metadata={"help": "largest max_new_tokens a request may ask for"})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SteerUIConfig, argv, description=__doc__)
    from sae.steering.steer import load_steering
    from sae.steering.ui import SteerServer
    if not cfg.sae:
        raise UserError("--sae: give the SAE folder to steer with")
    if not 0 <= cfg.port < 65536 or cfg.max_new_tokens < 1:
        raise UserError(f"--port must be in [0, 65535] and --max-new-tokens >= 1, got {cfg.port}, {cfg.max_new_tokens}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    st = load_steering(cfg.model, cfg.sae, cfg.labels, cfg.tokenizer, device=device,
                       dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    server = SteerServer(st, cfg.port, cfg.host, cfg.max_new_tokens)
    print(f"steering UI on {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    run_main(main)
