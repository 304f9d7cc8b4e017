"""Train sparse autoencoders: on an activation store, or straight from the model (no store), many at once.

    python scripts/train_sae.py --store runs/acts --out runs/sae --k 32 --expansion 8 --steps 10000
    torchrun --nproc_per_node 2 scripts/train_sae.py --store runs/acts ...   (gloo on CPU, NCCL on GPU)

    python scripts/train_sae.py --model weights/tiny --inputs weights/tiny/heldout.txt --out runs/many \\
        --points blocks.1.hook_resid_post blocks.2.hook_resid_post --expansion 8 16 --k 16 32 --steps 2000
    torchrun --nproc_per_node 8 scripts/train_sae.py --model M --inputs data/ --points ... [--distribute-saes]

--store is a store folder (scripts/capture.py) or a .pt file holding one [rows, d_model] tensor.
Writes OUT/sae/ (SAELens-style cfg.json + sae_weights.safetensors), OUT/checkpoint.pt, OUT/metrics.jsonl,
OUT/train_config.json. Re-run the same command with --resume to continue exactly where a killed run stopped.
Ctrl-C (or SIGTERM) finishes the current step, writes OUT/checkpoint.pt and prints the command that resumes.
An --out that already holds a run is refused: --resume continues it, --overwrite replaces it and its results.
Without --store: contexts exactly as scripts/capture.py makes them (same flags), one forward per step feeds every
SAE of every point; each SAE goes to OUT/<point>/<shape>/ (sae/, metrics.jsonl), a table of all of them to
OUT/summary.txt. Nothing but SAE files, checkpoints and logs is written; --resume continues bit-identically.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



from llama.cli import parse_config, run_main  # noqa: E402
from llama.stop import rerun_command  # noqa: E402
from sae import dist  # noqa: E402
from sae.multi import StreamTrainConfig, summary_table  # noqa: E402
from sae.activations.source import open_source  # noqa: E402
from sae.train import train  # noqa: E402
from sae.train_many import train_many  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    stream_cfg = parse_config(StreamTrainConfig, argv, description=__doc__)
    info = dist.init(stream_cfg.device)
    try:
        if not stream_cfg.store:
            many = train_many(stream_cfg, info)
            if many.stopped:
                if info.is_main:
                    print(f"resume with: {rerun_command()}", flush=True)
                return 130 if many.stopped == "SIGINT" else 143
            if info.is_main:
                print(summary_table(many.summary) + f"\nsaved {len(many.summary)} SAE(s) under {many.out_dir}/")
            return 0
        cfg = stream_cfg.store_config()
        source = open_source(cfg.store)
        res = train(cfg, source, info)
        if res.stopped:  # Ctrl-C / SIGTERM: a checkpoint was written and the trainer said where
            if info.is_main:
                print(f"resume with: {rerun_command()}", flush=True)
            return 130 if res.stopped == "SIGINT" else 143
        if info.is_main:
            keys = ("step", "fvu", "l0", "auxk", "dead", "dense", "val_fvu", "val_l0", "tokens_per_s")
            print("\n".join(f"{k:>14}: {res.metrics[k]:.6g}" for k in keys if k in res.metrics))
            print(f"saved SAE to {res.out_dir / 'sae'}")
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
