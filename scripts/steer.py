"""Generate with latents of an SAE steered (added to or clamped), next to the unsteered completion.

    python scripts/steer.py --sae runs/sae/sae --prompt "Once upon a time" --steer 123:8
    python scripts/steer.py --sae runs/sae/sae --labels runs/analysis/labels.json --steer "dogs:6" "7:0:clamp" \\
        --prompt "A" "B" --temperature 0.7 --top-p 0.9 --seed 1 --show-latents 3
    python scripts/steer.py --model weights/Llama-3.2-1B-Instruct --sae runs/sae1b/sae --chat --prompt "Hi" --steer 5:10
    python scripts/steer.py --sae runs/sae/sae --reconstruct        # pure SAE reconstruction, no steering (fidelity)

A steer is TARGET:STRENGTH[:add|clamp]; TARGET is a latent index or text searched in the labels table.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama.cli import UserError, atomic_write_json, parse_config, run_main, save_config  # noqa: E402


@dataclass
class SteerConfig:
    sae: str = field(default="", metadata={"help": "SAE folder (cfg.json + sae_weights.safetensors)"})
    model: str = field(default="weights/tiny", metadata={"help": "model the SAE was trained on (folder, .gguf "
                                                                 "file, or a name: smollm2)"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer file or folder (default: --model)"})
    labels: str = field(default="", metadata={"help": "labels.json (steer by label text)"})
    prompt: list[str] = field(default_factory=lambda: ["Once upon a time"], metadata={"help": "prompts (a batch)"})
    steer: list[str] = field(default_factory=list, metadata={"help": "TARGET:STRENGTH[:add|clamp], several allowed"})
    chat: bool = field(default=False, metadata={"help": "each prompt is a user turn in the model's chat format "
                                                        "(Llama 3's or ChatML, from its tokenizer)"})
    system: str = field(default="", metadata={"help": "system message (chat mode)"})
    reconstruct: bool = field(default=False, metadata={"help": "pure SAE reconstruction: drop the error term"})
    compare: bool = field(default=True, metadata={"help": "also generate the unsteered completion (same batch)"})
    show_latents: int = field(default=0, metadata={"help": "print the N most active latents per generated token"})
    max_new_tokens: int = 64
    temperature: float = field(default=0.6, metadata={"help": "0 = greedy"})
    top_p: float = 0.9
    seed: int = 0
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})
    out: str = field(default="", metadata={"help": "also write the results as JSON here (config beside it)"})


def named(labels: dict, latent: int) -> str:
    """' "label"' for a labelled latent, nothing for one without a label (never a bare '')."""
    from sae.steering.steer import label_of
    label = label_of(labels, latent)
    return f" {label!r}" if label else ""


def show_latents(tokens: list, labels: dict) -> None:
    for piece, lat, _ in tokens:
        print(f"  {piece!r:>16}  " + ", ".join(f"{j}{named(labels, j)}={a:.2f}" for j, a in lat))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SteerConfig, argv, description=__doc__)
    from llama.chat import chat_format, no_chat_warning
    from sae.steering.steer import encode_prompts, load_steering, parse_steer, steered_stream
    if not cfg.sae:
        raise UserError("--sae: give the SAE folder to steer with")
    if not cfg.prompt:
        raise UserError("--prompt: give at least one prompt")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    st = load_steering(cfg.model, cfg.sae, cfg.labels, cfg.tokenizer, device=device,
                       dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    n_latents = int(st.sae.W_dec.shape[0])
    steers = [parse_steer(s, st.labels).validate(n_latents) for s in cfg.steer]  # all checked before any is shown
    for s in steers:
        print(f"steer latent {s.latent}{named(st.labels, s.latent)}: {s.mode} {s.strength:g}")
    if cfg.chat and chat_format(st.tokenizer) is None:
        print(no_chat_warning(cfg.tokenizer or cfg.model), file=sys.stderr)
    ids = encode_prompts(st.tokenizer, cfg.prompt, chat=cfg.chat, system=cfg.system or None)
    n = len(ids)
    compare = cfg.compare and (bool(steers) or cfg.reconstruct)
    rows = [True] * n + [False] * n if compare else None
    prompts = ids * 2 if compare else ids
    texts, toks = [""] * len(prompts), [[] for _ in prompts]
    for ev in steered_stream(st.model, st.tokenizer, st.sae, prompts, steers, cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                             error_term=not cfg.reconstruct, rows=rows, record=cfg.show_latents):
        texts[ev.index] += ev.text
        if ev.stop_reason != "stop":
            toks[ev.index].append((st.tokenizer.decode([ev.token]), ev.latents, ev.token))
    results = []
    for i, p in enumerate(cfg.prompt):
        print(f"=== [{i}] {p!r}\n--- steered{' (reconstruction)' if cfg.reconstruct else ''}:\n{texts[i]}")
        if cfg.show_latents:  # each side's latents under its own heading, from its own forward
            show_latents(toks[i], st.labels)
        if compare:
            print(f"--- unsteered:\n{texts[n + i]}")
            if cfg.show_latents:
                show_latents(toks[n + i], st.labels)
        results.append({"prompt": p, "steered": texts[i], "unsteered": texts[n + i] if compare else None,
                        "latents": [{"token": t, "token_id": j, "latents": lat} for t, lat, j in toks[i]],
                        "unsteered_latents": [{"token": t, "token_id": j, "latents": lat} for t, lat, j in toks[n + i]]
                        if compare else None})
    if cfg.out:
        atomic_write_json(cfg.out, {"steers": [s.__dict__ for s in steers], "results": results})
        save_config(cfg, Path(cfg.out).with_suffix(".config.json"))
    return 0


if __name__ == "__main__":
    run_main(main)
