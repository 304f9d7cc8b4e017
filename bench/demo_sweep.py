"""The sweep behind the real-model demo's preset (sae/pipeline.py REAL): for every capture point of a store and
every k, train a TopK SAE and measure it on held-out text: FVU, L0, dead and dense fractions (on a held-out store),
CE-loss recovered and delta LM loss (the SAE spliced into the model), and the training time.

    python scripts/demo.py --model smollm2 --out runs/demo-smollm2     # writes the corpus (and more) first
    python scripts/capture.py --model smollm2 --inputs sweep.jsonl --out runs/sweep/train --mode windows \\
        --ctx-len 128 --min-pos 2 --dtype bfloat16 --val-fraction 0 --points blocks.9.hook_resid_post blocks.14.hook_resid_post \\
        blocks.19.hook_resid_post                                       # sweep.jsonl: every 3rd training document
    python scripts/capture.py ... --inputs runs/demo-smollm2/corpus/heldout.jsonl --out runs/sweep/heldout \\
        --val-fraction 1 --max-docs 400                                 # same points
    python bench/demo_sweep.py --store runs/sweep/train --heldout runs/sweep/heldout \\
        --text runs/demo-smollm2/corpus/heldout.jsonl --ks 16 32 64

Rows are printed as they finish and saved to OUT/sweep.json. The machine is shared: the train seconds of one run
compare with each other only.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama.cli import atomic_write_json, parse_config, run_main, save_config  # noqa: E402
from sae.pipeline import REAL  # noqa: E402


@dataclass
class SweepConfig:
    store: str = field(default="", metadata={"help": "training store holding every point swept"})
    heldout: str = field(default="", metadata={"help": "held-out store (captured with --val-fraction 1), same points"})
    text: str = field(default="", metadata={"help": "held-out documents for CE-loss recovered"})
    model: str = "smollm2"
    points: list[str] = field(default_factory=list, metadata={"help": "points to sweep (default: all of the store's)"})
    ks: list[int] = field(default_factory=lambda: [16, 32, 64])
    expansion: int = 8
    steps: int = 300
    lr: float = field(default=REAL["lr"], metadata={"help": "peak LR (default: the demo's real-model preset)"})
    batch_size: int = 2048
    dead_tokens: int = 200_000
    lm_seqs: int = field(default=16, metadata={"help": "held-out sequences of 128 tokens for the CE metrics"})
    out: str = "runs/sweep"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SweepConfig, argv, description=__doc__)
    import llama
    from sae.activations.inputs import expand_inputs, iter_documents
    from sae.activations.store import open_store
    from sae.config import TrainConfig
    from sae.evaluate import activation_metrics, lm_metrics, sink_token_ids, tokenize_documents
    from sae.train import train
    out = Path(cfg.out)
    save_config(cfg, out / "sweep_config.json")
    store, held = open_store(cfg.store), open_store(cfg.heldout)
    points = cfg.points or store.points
    model = llama.load_model(cfg.model, dtype=torch.float32)
    tok = llama.Tokenizer.from_file(llama.resolve_model(cfg.model))
    tokens = tokenize_documents(tok, iter_documents(expand_inputs([cfg.text])), 128, cfg.lm_seqs)
    rows = []
    head = f"{'point':<26} {'k':>3} {'FVU':>7} {'L0':>6} {'dead':>6} {'dense':>6} {'CE rec':>7} {'dLM':>7} {'train s':>7}"
    print(f"{store.num_rows('train'):,} training rows, {held.num_rows('val'):,} held-out rows, "
          f"{tokens.numel():,} CE tokens\n{head}")
    for point in points:
        for k in cfg.ks:
            t0 = time.perf_counter()
            res = train(TrainConfig(store=cfg.store, point=point, out=str(out / f"{point}-k{k}"), k=k,
                                    expansion=cfg.expansion, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                                    dead_tokens=cfg.dead_tokens, device="cpu", overwrite=True, progress=False,
                                    val_every=0), store)
            train_s = time.perf_counter() - t0
            sae = res.sae
            sae.cfg.hook_name = point
            act = activation_metrics(sae, held, point=point)
            lm = lm_metrics(sae, model, tokens, sink_ids=sink_token_ids(tok))
            row = {"point": point, "k": k, "fvu": act["fvu"], "l0": act["l0"], "dead": act["dead_fraction"],
                   "dense": act["dense_fraction"], "ce_loss_recovered": lm["ce_loss_recovered"],
                   "delta_lm_loss": lm["delta_lm_loss"], "ce_clean": lm["ce_clean"], "train_s": train_s,
                   "heldout_tokens": act["tokens"]}
            rows.append(row)
            print(f"{point:<26} {k:>3} {row['fvu']:>7.4f} {row['l0']:>6.1f} {row['dead']:>6.3f} {row['dense']:>6.3f} "
                  f"{row['ce_loss_recovered']:>7.4f} {row['delta_lm_loss']:>7.4f} {train_s:>7.0f}", flush=True)
            atomic_write_json(out / "sweep.json", {"rows": rows})
    return 0


if __name__ == "__main__":
    run_main(main)
