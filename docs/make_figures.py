"""Make the pictures of docs/llama.md and docs/sae.md (docs/img/*.png) from real runs.

    pip install matplotlib                      # docs/dev only (requirements-dev.txt); torch is not touched
    python docs/make_figures.py                 # all of them (a few minutes on 2 CPU cores)
    python docs/make_figures.py logit_lens      # only some

The model figures run the guide's own snippets first (docs/doctools.py `execute`) and draw from what they computed
(the model, the attention-pattern function, the captured activations), so a picture shows exactly what the guide's
text describes. The SAE figures train small SAEs: a sweep on the guide's synthetic data, and a run on the SmolLM2
activations the guide captures, with and without AuxK. Nothing here is imported by the library or the tests
(tests/test_docs.py only checks that the pictures exist and that this file imports without matplotlib).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
IMG = DOCS / "img"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))

import doctools  # noqa: E402  (docs/doctools.py)

_guides: dict[str, dict[str, Any]] = {}


def guide(name: str) -> dict[str, Any]:
    """The namespace left by running docs/<name>.md's snippets (run once per process)."""
    if name not in _guides:
        print(f"running docs/{name}.md ...", flush=True)
        _guides[name] = doctools.execute(DOCS / f"{name}.md")
    return _guides[name]


def _plt() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _save(fig: Any, name: str) -> Path:
    IMG.mkdir(exist_ok=True)
    path = IMG / f"{name}.png"
    fig.savefig(path, bbox_inches="tight")
    _plt().close(fig)
    print(f"wrote {path.relative_to(ROOT)}")
    return path


# ------------------------------------------------------------------------------------------- docs/llama.md
def rope_scaling() -> Path:
    """Wavelength of every RoPE pair before and after llama3 scaling (Llama 3.2 1B: factor 32; 3.1 8B: 8)."""
    import llama
    from llama.rope import rope_frequencies
    plt = _plt()
    a32, a31 = llama.ModelArgs.llama_3_2_1b(), llama.ModelArgs.llama_3_1_8b()
    base = rope_frequencies(dataclasses.replace(a32, use_scaled_rope=False))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    def where(args: llama.ModelArgs) -> list[float]:  # pair i at 2i / head_dim: both head dims on one axis
        return [2 * i / args.head_dim for i in range(args.head_dim // 2)]
    ax.plot(where(a32), 2 * math.pi / base, "o-", ms=3, color="0.45", label="unscaled (base 500,000)")
    for args, name, color in ((a31, "Llama 3.1 8B (factor 8, head_dim 128)", "tab:blue"),
                              (a32, "Llama 3.2 1B/3B (factor 32, head_dim 64)", "tab:red")):
        ax.plot(where(args), 2 * math.pi / rope_frequencies(args), "o-", ms=2.5, color=color, label=name)
    old = a32.rope_original_max_pos
    for wl, text in ((old / a32.rope_high_freq_factor, "2048 = 8192 / high_freq_factor: shorter is kept"),
                     (old / a32.rope_low_freq_factor, "8192 / low_freq_factor: longer is divided by factor")):
        ax.axhline(wl, color="0.7", lw=0.8, ls="--")
        ax.text(0.62, wl / 1.3, text, color="0.4", fontsize=7.5, va="top")
    ax.set_yscale("log")
    ax.set_xlabel("rotation pair i, as 2i / head_dim (θ_i = base^(-2i / head_dim))")
    ax.set_ylabel("wavelength 2π / θ_i (tokens)")
    ax.set_title("RoPE frequencies and Llama 3's scaling (llama/rope.py)")
    ax.legend(frameon=False, loc="upper left")
    return _save(fig, "rope_scaling")


def attention_heads() -> Path:
    """Three heads of SmolLM2 on the guide's repeated random sequence: induction, previous token, sink."""
    ns = guide("llama")
    plt = _plt()
    h = ns["streams"](ns["repeated"])
    heads = ((18, 6, "layer 18, head 6: induction"), (16, 0, "layer 16, head 0: previous token"),
             (18, 8, "layer 18, head 8: sink"))
    fig, axes = plt.subplots(1, 3, figsize=(11, 4), layout="constrained")
    for ax, (layer, head, title) in zip(axes, heads):
        p = ns["attention_patterns"](h[layer], layer)[head]
        im = ax.imshow(p.numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xlabel("key position")
        ax.axvline(20.5, color="w", lw=0.6, ls=":")
        ax.axhline(20.5, color="w", lw=0.6, ls=":")
    axes[0].set_ylabel("query position")
    fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight")
    fig.suptitle("Attention weights on BOS + 20 random tokens + the same 20 again (dotted: where the copy starts)")
    return _save(fig, "attention_heads")


def residual_norms() -> Path:
    """Residual norm per layer: position 0, an <|endoftext|> in the middle of the text, ordinary tokens."""
    import torch
    ns = guide("llama")
    model, tok = ns["model"], ns["tok"]
    plt = _plt()
    first = tok.encode("The Eiffel Tower is in Paris, the capital of France.", bos=True, eos=False)
    second = tok.encode("Return the number of items in the list.", bos=True, eos=False)
    tokens = torch.tensor([first + second])  # the second document starts with <|endoftext|> too
    n_layers = model.args.n_layers
    names = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    with torch.no_grad():
        acts = model(tokens, capture=names, stop_early=True).activations
    norms = torch.stack([acts[n][0].norm(dim=-1) for n in names])  # [layers, T]
    mid = len(first)
    ordinary = [i for i in range(tokens.shape[1]) if i not in (0, mid)]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.plot(norms[:, 0], "o-", ms=3, color="tab:red", label="position 0 (<|endoftext|>)")
    ax.plot(norms[:, mid], "s-", ms=3, color="tab:orange", label=f"position {mid}: <|endoftext|> between documents")
    med = norms[:, ordinary].median(dim=1).values
    ax.plot(med, "o-", ms=3, color="tab:blue", label="median of the other positions")
    ax.fill_between(range(n_layers), norms[:, ordinary].min(dim=1).values, norms[:, ordinary].max(dim=1).values,
                    color="tab:blue", alpha=0.15, label="their range")
    ax.set_yscale("log")
    ax.set_xlabel("layer (hook_resid_post)")
    ax.set_ylabel("||h||")
    ax.set_title("Attention sinks in SmolLM2-135M's residual stream")
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, "residual_norms")


def logit_lens() -> Path:
    """The top next-token guess (and its probability) at every layer and position of the guide's sentence."""
    import torch
    ns = guide("llama")
    model, tok, acts, tokens = ns["model"], ns["tok"], ns["acts"], ns["tokens"]
    plt = _plt()
    n_layers, T = model.args.n_layers, tokens.shape[1]
    with torch.no_grad():
        probs = torch.stack([model.output(model.norm(acts[f"blocks.{i}.hook_resid_post"][0])).softmax(-1)
                             for i in range(n_layers)])  # [layers, T, N]
    top_p, top = probs.max(-1)

    def shown(piece: str) -> str:  # a token as text: escapes for \n and friends, a leading space as an open box
        text = repr(piece)[1:-1]
        return "\u2423" + text[1:] if text.startswith(" ") else text
    fig, ax = plt.subplots(figsize=(9, 8.5))
    ax.imshow(top_p.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for layer in range(n_layers):
        for t in range(T):
            ax.text(t, layer, shown(tok.decode([int(top[layer, t])]))[:9], ha="center", va="center", fontsize=6.5,
                    color="w" if top_p[layer, t] > 0.45 else "k")
    ax.set_xticks(range(T), [shown(tok.decode([int(i)])) for i in tokens[0]], rotation=45, ha="right")
    ax.set_yticks(range(0, n_layers, 2))
    ax.set_ylabel("layer (norm + output applied to hook_resid_post)")
    ax.set_xlabel("position (the token the guess is made at)")
    ax.set_title("Logit lens on SmolLM2-135M: top next token after each layer (shade: its probability)")
    return _save(fig, "logit_lens")


# --------------------------------------------------------------------------------------------- docs/sae.md
def sae_architectures() -> Path:
    """FVU and feature recovery against L0 for TopK, BatchTopK and ReLU + L1, on the guide's synthetic data."""
    import torch
    from sae import TensorSource, TrainConfig
    from sae.evaluate import activation_metrics
    from sae.synthetic import SyntheticConfig, generate, recovery
    from sae.train import train
    torch.set_num_threads(1)
    plt = _plt()
    data = generate(SyntheticConfig(d=32, n_features=128, rows=20_000, avg_active=3, seed=0))
    source = TensorSource(data.x)
    ks = (1, 2, 3, 4, 6, 8, 12, 16, 24)
    sweeps = {"topk": [{"k": k} for k in ks], "batchtopk": [{"k": k} for k in ks],
              "relu": [{"l1_coef": c} for c in (0.3, 0.6, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0)]}
    results: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, runs in sweeps.items():
            for n, flags in enumerate(runs):
                cfg = TrainConfig(out=f"{tmp}/{arch}{n}", architecture=arch, n_latents=128, steps=400, batch_size=256,
                                  val_every=0, progress=False, **flags)
                trained = train(cfg, source).sae.eval()
                m = activation_metrics(trained, source)
                results.setdefault(arch, []).append((m["l0"], m["fvu"], recovery(data.features, trained.W_dec)))
                print(f"{arch} {flags}: L0 {m['l0']:.2f} FVU {m['fvu']:.3f}", flush=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    style = {"topk": ("o-", "tab:blue", "TopK (k = 1 .. 24)"), "batchtopk": ("s-", "tab:green", "BatchTopK (k = 1 .. 24)"),
             "relu": ("^-", "tab:red", "ReLU + L1 (λ = 12 .. 0.3)")}
    for arch, rows in results.items():
        rows.sort()
        marker, color, label = style[arch]
        ax1.plot([r[0] for r in rows], [r[1] for r in rows], marker, color=color, ms=4, label=label)
        ax2.plot([r[0] for r in rows], [r[2] for r in rows], marker, color=color, ms=4, label=label)
    ax1.set_xscale("log")
    ax2.set_xscale("log")
    ax1.set_xlabel("L0 (active latents per token, held out)")
    ax2.set_xlabel("L0")
    ax1.set_ylabel("FVU (held out)")
    ax2.set_ylabel("feature recovery (mean best cosine)")
    ax1.set_ylim(0, 1.05)
    for ax in (ax1, ax2):
        ax.axvline(3, color="0.7", lw=0.8, ls=":")  # the data's own L0
    ax1.text(3.1, 0.98, "the data: ~3 features per row", color="0.4", fontsize=7.5, va="top")
    ax1.legend(frameon=False, loc="upper right", bbox_to_anchor=(1.0, 0.9))
    fig.suptitle("128 features in 32 dimensions, ~3 active per row; 128 latents, 400 steps of 256 rows each")
    return _save(fig, "sae_architectures")


def auxk_dead() -> Path:
    """Dead-latent fraction during training, with and without AuxK: the guide's synthetic data, 8x more latents
    than features, a latent dead after 5,120 tokens (20 steps) unfired."""
    import torch
    from sae import TensorSource, TrainConfig
    from sae.synthetic import SyntheticConfig, generate
    from sae.train import Trainer
    torch.set_num_threads(1)
    plt = _plt()
    data = generate(SyntheticConfig(d=32, n_features=128, rows=40_000, avg_active=3, seed=0))
    curves: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, aux in (("with AuxK (weight 1/32)", 1 / 32), ("without AuxK (weight 0)", 0.0)):
            cfg = TrainConfig(out=f"{tmp}/{aux}", n_latents=1024, k=3, steps=1000, batch_size=256, aux_coef=aux,
                              dead_tokens=5120, val_every=0, progress=False, seed=0)
            trainer = Trainer(cfg, TensorSource(data.x))
            dead: list[float] = []
            trainer.run(lambda step, sae: dead.append(float((trainer.tokens_since_fired >= cfg.dead_tokens)
                                                            .float().mean())))
            curves[name] = dead
            print(f"{name}: {dead[-1]:.3f} dead at the end", flush=True)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for (name, dead), color in zip(curves.items(), ("tab:blue", "tab:red")):
        ax.plot(range(1, len(dead) + 1), dead, color=color, label=name)
    ax.set_xlabel("training step (256 rows each)")
    ax.set_ylabel("fraction of latents dead")
    ax.set_title("1024 latents, k = 3, on 128 synthetic features in 32 dims; dead = unfired for 5,120 tokens")
    ax.legend(frameon=False)
    return _save(fig, "auxk_dead")


FIGURES: dict[str, Callable[[], Path]] = {f.__name__: f for f in (
    rope_scaling, attention_heads, residual_norms, logit_lens, sae_architectures, auxk_dead)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"figures to make (default: all): {', '.join(FIGURES)}")
    names = p.parse_args(argv).names or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        p.error(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    for name in names:
        FIGURES[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
