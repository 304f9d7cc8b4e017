"""SAE evaluation: activation-space metrics on the store's held-out split, and LM metrics with the SAE spliced
into the Llama at its capture point (no error term: the reconstruction replaces the activation).

Attention sinks (position 0 of each row, and BOS / end-of-text tokens anywhere, `sink_token_ids`) have residual
norms ~100x the median; the store never holds them, so the SAE never trained on them (nor positions below the
store's `min_pos`, e.g. SmolLM2's position-1 sinks: treated alike when --store is given). The LM metrics leave them
clean in every run (SAE splice, zero and mean ablation alike), leave them out of the ablation mean, and leave
their next-token predictions out of the CE averages, as SAELens' evaluation does with its ignore_tokens (which
SAELens' zero ablation does not spare; here both ablations touch exactly the positions the SAE replaces).

    acts = activation_metrics(sae, store)            # L0, FVU, dead / dense fractions, log10-density histogram
    lm = lm_metrics(sae, model, tokens)              # CE clean / SAE / zero- and mean-ablated, recovered, delta
    print(format_table({**acts, **lm}))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from llama.cli import UserError, atomic_write_bytes, atomic_write_json, progress_bar, save_config
from sae.activations.packing import SINK_NAMES, sink_token_ids  # noqa: F401  (one definition of the sinks)
from sae.loss import ce_loss_recovered, fire_counts, usage
from sae.model import SAE

MAX_TOKENS = 1 << 20  # held-out rows for the activation metrics: the whole validation split up to this many


@torch.no_grad()
def activation_metrics(sae: SAE, source: Any, batch_size: int = 4096, max_tokens: int = MAX_TOKENS,
                       split: str = "val", point: str | None = None, bins: int = 20) -> dict[str, Any]:
    """Pooled over every row of the held-out split, up to `max_tokens` (in store order, read `batch_size` rows at a
    time): FVU = sum||x - x_hat||^2 / sum||x - mean||^2. "tokens" says how many rows that was."""
    sae.eval()
    n = sae.cfg.n_latents
    counts = torch.zeros(n, dtype=torch.long, device=sae.device)
    err = sxx = 0.0
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=sae.device)
    tokens, l0_sum = 0, 0.0
    n_rows = min(source.num_rows(split), max_tokens)
    for i0 in range(0, n_rows, batch_size):
        x = source.rows(i0, min(i0 + batch_size, n_rows), split=split, point=point).to(sae.device, torch.float32)
        acts, idx = sae.encode(x)
        x_hat = sae.decode(acts, idx, like=x).float()
        xd = x.double()
        err += float((x.float() - x_hat).double().pow(2).sum())
        sum_x += xd.sum(0)
        sxx += float(xd.pow(2).sum())
        counts += fire_counts(acts, idx, n)
        l0_sum += float((acts > 0).sum())
        tokens += x.shape[0]
    if tokens == 0:
        raise UserError(f"no {split} rows to evaluate on")
    total_var = sxx - float(sum_x.pow(2).sum()) / tokens
    use = usage(counts, tokens)
    density = counts.double().cpu() / tokens
    live = density[density > 0]
    edges = torch.linspace(-math.log10(tokens) - 0.5, 0.0, bins + 1) if live.numel() else torch.zeros(bins + 1)
    hist = torch.histogram(live.log10().float(), bins=edges.float()).hist if live.numel() else torch.zeros(bins)
    return {"tokens": tokens, "l0": l0_sum / tokens, "fvu": err / max(total_var, 1e-30),
            "dead_fraction": use.dead_fraction, "dense_fraction": use.dense_fraction,
            "density_hist": {"log10_edges": [round(float(e), 3) for e in edges], "counts": [int(c) for c in hist],
                             "dead": int((counts == 0).sum())}}


SINK_NORM = 10.0  # a position whose activation norm is above this x the median is an attention sink (ordinary
#                   SmolLM2 layer-14 rows stay below 6x; its position-1 sinks are ~150x)


def ordinary_positions(tokens: Tensor, sink_ids: Iterable[int] = (), min_pos: int = 1) -> Tensor:
    """[B, T] bool: True except at positions < max(1, min_pos) and at sink tokens (where the SAE is never
    spliced; min_pos: the training store's, whose rows started there)."""
    ids = torch.tensor(sorted(set(sink_ids)), dtype=tokens.dtype, device=tokens.device)
    ordinary = ~torch.isin(tokens, ids)
    ordinary[:, :max(1, min_pos)] = False
    return ordinary


def _ce(logits: Tensor, tokens: Tensor, ordinary: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy of the predictions made at ordinary positions, and their number."""
    keep = ordinary[:, :-1].reshape(-1)
    lg = logits[:, :-1].float().reshape(-1, logits.shape[-1])[keep]
    return float(F.cross_entropy(lg, tokens[:, 1:].reshape(-1)[keep], reduction="sum")), lg.shape[0]


@torch.no_grad()
def lm_metrics(sae: SAE, model: torch.nn.Module, tokens: Tensor, batch_size: int = 8,
               hook_name: str | None = None, progress: bool = False, sink_ids: Iterable[int] = (),
               sink_norm: float = SINK_NORM, min_pos: int = 1) -> dict[str, float]:
    """tokens [N, T]: CE clean, with the SAE's reconstruction spliced in, and with the activation zero- or
    mean-ablated (mean over these tokens' clean activations), plus CE-loss recovered and delta LM loss. Only
    ordinary positions are edited and scored: never a position < max(1, min_pos) of a row or a token in `sink_ids`
    (see the module doc), nor a position whose clean activation norm exceeds `sink_norm` x its batch's median (0:
    off; counted in "sink_positions")."""
    hook = hook_name or sae.cfg.hook_name
    if hook not in model.valid_points():
        raise UserError(f"SAE hook {hook!r} is not a capture point of this model (valid: {model.valid_points()})")
    sae.eval()
    dev = next(model.parameters()).device
    tokens = tokens.to(dev)
    batches = [(tb, ordinary_positions(tb, sink_ids, min_pos)) for tb in tokens.split(batch_size)]
    if not any(bool(o[:, :-1].any()) for _, o in batches):
        raise UserError("no ordinary positions to evaluate on (every token is position 0 or a BOS/EOS token)")

    def splice(ordinary: Tensor):
        def fn(h: Tensor) -> Tensor:  # the SAE's reconstruction at ordinary positions only
            if not bool(ordinary.any()):
                return h
            rows = h[ordinary]
            return h.index_put((ordinary,), sae.decode(*sae.encode(rows), like=rows).to(h.dtype))
        return fn

    def put(ordinary: Tensor, value: Tensor):
        return lambda h: torch.where(ordinary[..., None], value.to(h.dtype), h)

    total = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0}
    count, act_sum, act_n, n_sinks = 0, None, 0, 0
    bar = progress_bar(total=4 * len(batches), unit="forward", desc="LM metrics", disable=not progress)
    for tb, ordinary in batches:  # pass 1: clean CE and the mean activation over ordinary positions
        out = model(tb, capture=[hook])
        if sink_norm > 0 and bool(ordinary.any()):  # sinks by norm (SmolLM2: a delimiter at position 1 ...)
            norms = out.activations[hook].float().norm(dim=-1)
            sink = ordinary & (norms > sink_norm * norms[ordinary].median())
            n_sinks += int(sink.sum())
            ordinary &= ~sink  # in place: pass 2 leaves them clean too
        ce, m = _ce(out.logits, tb, ordinary)
        total["clean"] += ce
        count += m
        a = out.activations[hook][ordinary].double()
        act_sum = a.sum(0) if act_sum is None else act_sum + a.sum(0)
        act_n += a.shape[0]
        bar.update(1)
    mean_act = (act_sum / act_n).float()
    for tb, ordinary in batches:
        edits = {"sae": splice(ordinary), "zero": put(ordinary, mean_act.new_zeros(())),
                 "mean": put(ordinary, mean_act)}
        for name, fn in edits.items():
            total[name] += _ce(model(tb, edit={hook: fn}).logits, tb, ordinary)[0]
            bar.update(1)
    bar.close()
    ce = {k: v / count for k, v in total.items()}
    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"], "ce_mean_ablation": ce["mean"],
            "ce_loss_recovered": ce_loss_recovered(ce["clean"], ce["sae"], ce["zero"]),
            "ce_loss_recovered_mean_ablation": ce_loss_recovered(ce["clean"], ce["sae"], ce["mean"]),
            "delta_lm_loss": ce["sae"] - ce["clean"], "lm_tokens": count, "sink_positions": n_sinks}


def tokenize_documents(tokenizer: Any, docs: Iterable[str], seq_len: int, max_seqs: int) -> Tensor:
    """Concatenate BOS-prefixed documents and cut them into [N, seq_len] rows (the last partial row dropped)."""
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer.encode(doc, bos=True, eos=False)
        if len(stream) >= seq_len * max_seqs:
            break
    n = min(len(stream) // seq_len, max_seqs)
    if n == 0:
        raise UserError(f"held-out text has {len(stream)} tokens, fewer than one sequence of --seq-len {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def format_table(metrics: dict[str, Any]) -> str:
    """Readable two-column table of the scalar metrics (plus the density histogram as a bar chart)."""
    rows = [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in metrics.items() if not isinstance(v, dict)]
    width = max(len(k) for k, _ in rows) if rows else 0
    lines = ["metric".ljust(width) + "  value", "-" * (width + 12)] + [k.ljust(width) + "  " + v for k, v in rows]
    hist = metrics.get("density_hist")
    if hist:
        lines += ["", f"latent density (log10 firing rate; {hist['dead']} dead)"]
        top = max(hist["counts"]) or 1
        e = hist["log10_edges"]
        for i, c in enumerate(hist["counts"]):
            lines.append(f"  [{e[i]:6.2f}, {e[i + 1]:6.2f})  {'#' * round(40 * c / top):<40} {c}")
    return "\n".join(lines)


@dataclass
class EvalConfig:
    """Flags of `scripts/evaluate.py`."""
    sae: str = field(default="", metadata={"help": "SAE folder (cfg.json + sae_weights.safetensors)"})
    store: str = field(default="", metadata={"help": "activation store: L0/FVU/dead/dense on its held-out split"})
    model: str = field(default="", metadata={"help": "Llama folder, .gguf file or name (smollm2) for CE-loss "
                                                    "recovered (default: the SAE's model)"})
    text: list[str] = field(default_factory=list, metadata={"help": "held-out text files (.txt/.jsonl/.parquet)"})
    seq_len: int = 128
    max_seqs: int = field(default=64, metadata={"help": "held-out sequences for the LM metrics"})
    lm_batch_size: int = 8
    sink_norm: float = field(default=SINK_NORM, metadata={"help": "LM metrics leave positions whose activation norm "
                                                                  "exceeds this x the median clean (0: off)"})
    act_batch_size: int = 4096
    max_tokens: int = field(default=MAX_TOKENS, metadata={"help": "held-out rows for L0/FVU/dead/dense: the store's "
                                                                  "whole validation split, up to this many"})
    out: str = field(default="", metadata={"help": "output folder (default: the SAE folder)"})
    device: str = "cpu"
    progress: bool = field(default=True, metadata={"help": "show a progress bar for the LM metrics"})


def run_evaluation(cfg: EvalConfig, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Everything the config asks for -> OUT/eval.json, OUT/eval.txt (the table), OUT/eval_config.json.
    `model` / `tokenizer`: already loaded ones of cfg.model (the demo's), else they are loaded in float32."""
    from sae.formats import load
    if not cfg.sae:
        raise UserError("--sae is required (an SAE folder)")
    sae = load(cfg.sae, device=cfg.device)
    metrics: dict[str, Any] = {"sae": cfg.sae, "hook_name": sae.cfg.hook_name, "n_latents": sae.cfg.n_latents,
                               "k": sae.cfg.k}
    min_pos = 1
    if cfg.store:
        from sae.activations.store import open_store
        point = sae.cfg.hook_name or None
        store = open_store(cfg.store)
        min_pos = int(store.manifest.get("min_pos", 0))  # positions the SAE's data never held are never spliced
        points = store.manifest.get("points") or []
        metrics.update(activation_metrics(sae, store, cfg.act_batch_size, cfg.max_tokens,
                                          point=point if point in points else None))
        capped = ", capped by --max-tokens" if metrics["tokens"] == cfg.max_tokens < store.num_rows("val") else ""
        print(f"L0, FVU, dead/dense on {metrics['tokens']:,} held-out tokens: the validation split of {cfg.store} "
              f"({store.val_fraction:.0%} of its documents{capped})")
    if cfg.text:
        import llama
        from sae.activations.inputs import expand_inputs, iter_documents
        model_dir = str(llama.resolve_model(cfg.model or sae.cfg.model)) if (cfg.model or sae.cfg.model) else ""
        if model is None and (not model_dir or not Path(model_dir).exists()):
            raise UserError(f"--model {model_dir!r}: no such model folder or file (needed for the LM metrics)")
        model = model if model is not None else llama.load_model(model_dir, device=cfg.device, dtype=torch.float32)
        tok = tokenizer if tokenizer is not None else llama.Tokenizer.from_file(model_dir)
        tokens = tokenize_documents(tok, iter_documents(expand_inputs(list(cfg.text))), cfg.seq_len, cfg.max_seqs)
        metrics.update(lm_metrics(sae, model, tokens, cfg.lm_batch_size, sink_ids=sink_token_ids(tok),
                                  sink_norm=cfg.sink_norm, progress=cfg.progress, min_pos=min_pos))
    if not (cfg.store or cfg.text):
        raise UserError("nothing to evaluate: give --store (activation metrics) and/or --text (LM metrics)")
    out = Path(cfg.out or cfg.sae)
    atomic_write_json(out / "eval.json", metrics)
    atomic_write_bytes(out / "eval.txt", (format_table(metrics) + "\n").encode())
    save_config(cfg, out / "eval_config.json")
    print(f"wrote {out / 'eval.json'}, eval.txt and eval_config.json{' (into the SAE folder)' if not cfg.out else ''}")
    return metrics
