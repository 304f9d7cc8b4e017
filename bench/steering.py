"""Measured steering check on the embedded tiny model: steer the latent whose decoder direction most specifically
promotes a token, and count that token (and the latent's top-10 "topic" tokens) in sampled completions, steered
vs unsteered, over many (prompt, seed) pairs. Prints one row per strength: rates, ratio, the paired effect size
(Cohen's d of per-completion count differences) and a two-sided sign test.

    python bench/steering.py --sae runs/tiny/sae                 # an SAE from scripts/train_sae.py
    python bench/steering.py                                     # trains a quick SAE in-process first (~1-2 min)
    python bench/steering.py --token " the" --strengths 2 4 8 16 --seeds 16 --prompts 16
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from llama.cli import UserError, atomic_write_json, parse_config, repo_path, run_main, save_config  # noqa: E402


@dataclass
class SteeringBenchConfig:
    model: str = field(default="weights/tiny", metadata={"help": "model folder"})
    sae: str = field(default="", metadata={"help": "SAE folder; empty: train a quick one on --text first"})
    text: str = field(default="", metadata={"help": "documents, one per line (default: MODEL/heldout.txt)"})
    hook: str = field(default="", metadata={"help": "quick SAE's capture point (default: middle layer resid_post)"})
    train_steps: int = field(default=600, metadata={"help": "quick SAE: optimizer steps"})
    token: str = field(default="", metadata={"help": "target token text (must encode to one token); default: auto"})
    strengths: list[float] = field(default_factory=lambda: [4.0, 8.0, 16.0, 32.0])
    mode: str = field(default="add", metadata={"choices": ["add", "clamp"]})
    prompts: int = field(default=16, metadata={"help": "prompts (first tokens of held-out documents)"})
    prompt_tokens: int = field(default=6, metadata={"help": "tokens per prompt, BOS included"})
    seeds: int = field(default=8, metadata={"help": "sampling seeds per prompt"})
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    threads: int = 2
    out: str = field(default="runs/bench_steering", metadata={"help": "folder for results.json (+ quick SAE)"})


def quick_sae(cfg: SteeringBenchConfig, model: torch.nn.Module, tok, text: Path, out: Path) -> Path:
    """Capture activations of the documents at the hook and train a TopK SAE on them with sae.train."""
    from sae.formats import save
    from sae.activations.source import TensorSource
    from sae.train import TrainConfig, train
    hook = cfg.hook or f"blocks.{model.args.n_layers // 2}.hook_resid_post"
    docs = [tok.encode(ln, bos=True, eos=False)[:256] for ln in text.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = []
    with torch.no_grad():
        for d in tqdm(docs, desc=f"capture {hook}"):
            x = model(torch.tensor([d]), capture=[hook], stop_early=True).activations[hook][0, 1:]  # skip BOS
            rows.append(x)
    x = torch.cat(rows).float()
    print(f"captured {x.shape[0]} rows of {x.shape[1]} at {hook}")
    tcfg = TrainConfig(out=str(out / "train"), steps=cfg.train_steps, batch_size=1024, expansion=8, k=16,
                       overwrite=True, val_every=0, ckpt_every=0, log_every=50, warmup_steps=50, init_rows=8192, progress=True)
    res = train(tcfg, TensorSource(x, manifest={"hook_name": hook, "model": cfg.model}))
    print(f"quick SAE: {res.metrics}")
    return save(res.sae, out / "sae")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SteeringBenchConfig, argv, description=__doc__)
    from sae.formats import load
    from sae.steering.check import measure_steering, pick_target
    from llama.checkpoint import load_model
    from llama.tokenizer import Tokenizer
    torch.set_num_threads(cfg.threads)
    cfg.model = str(repo_path(cfg.model))  # weights/tiny from any folder
    if not (Path(cfg.model) / "params.json").is_file() and not (Path(cfg.model) / "config.json").is_file():
        raise UserError(f"--model {cfg.model}: no checkpoint there (train the tiny one: python scripts/train_tiny_llama.py)")
    model = load_model(cfg.model).eval()
    tok = Tokenizer.from_file(cfg.model)
    text = Path(cfg.text or Path(cfg.model) / "heldout.txt")
    if not text.is_file():
        raise UserError(f"--text {text}: file not found (one document per line)")
    out = Path(cfg.out)
    t0 = time.time()
    sae = load(cfg.sae if cfg.sae else quick_sae(cfg, model, tok, text, out)).eval()
    exclude = set(tok.stop_tokens) | {tok.bos_id}
    token = None
    if cfg.token:
        ids = tok.encode(cfg.token, bos=False, eos=False)
        if len(ids) != 1:
            raise UserError(f"--token {cfg.token!r} encodes to {len(ids)} tokens {ids}; give text that is one token")
        token = ids[0]
    target = pick_target(model, sae, token=token, exclude=exclude)
    topic = [tok.decode([t]) for t in target.tokens]
    print(f"hook {sae.cfg.hook_name}; target latent {target.latent} -> token {topic[0]!r} (id {target.token}, "
          f"z-score {target.zscore:.1f}); topic tokens {topic}")
    lines = [ln for ln in text.read_text(encoding="utf-8").splitlines() if ln.strip()]
    prompts = [tok.encode(ln, bos=True, eos=False)[:cfg.prompt_tokens] for ln in lines[:cfg.prompts]]
    results = []
    head = (f"{'strength':>8} {'pairs':>5} {'rate unst':>9} {'rate steer':>10} {'ratio':>7} {'topic unst':>10} "
            f"{'topic steer':>11} {'mean diff':>9} {'cohen d':>7} {'win/loss':>9} {'sign p':>8}")
    rows = []
    for s in cfg.strengths:
        with tqdm(total=cfg.seeds, desc=f"strength {s:g}", leave=False) as bar:
            e = measure_steering(model, tok, sae, prompts, target, s, range(cfg.seeds), cfg.max_new_tokens,
                                 cfg.temperature, cfg.top_p, cfg.mode, progress=bar)
        ratio = e.rate_steered / e.rate_clean if e.rate_clean > 0 else float("inf") if e.rate_steered > 0 else float("nan")
        rows.append(f"{s:>8g} {e.n_pairs:>5} {e.rate_clean:>9.4f} {e.rate_steered:>10.4f} {ratio:>7.1f} "
                    f"{e.topic_clean / max(1, e.tokens_clean):>10.4f} {e.topic_steered / max(1, e.tokens_steered):>11.4f} "
                    f"{e.mean_diff:>9.2f} {e.cohens_d:>7.2f} {f'{e.wins}/{e.losses}':>9} {e.sign_p:>8.1e}")
        results.append({"strength": s, **e._asdict()})
    print(head, *rows, sep="\n")
    print(f"total {time.time() - t0:.0f}s")
    atomic_write_json(out / "results.json", {"target": {**target._asdict(), "token_text": topic[0], "topic_text": topic},
                                             "hook_name": sae.cfg.hook_name, "results": results})
    save_config(cfg, out / "config.json")
    return 0


if __name__ == "__main__":
    run_main(main)
