"""Pretrain a small Llama (our own `llama.Transformer`) from scratch on CPU: the embedded tiny model in weights/tiny.

    result = train(TrainConfig(out="weights/tiny"))   # corpus -> tokenizer -> model -> files, deterministic

The loop is nanoGPT's: sample B random windows of T+1 tokens from one long token stream, next-token cross-entropy,
AdamW with linear warmup then cosine decay, gradient clipping; every `eval_every` steps the loss on fixed held-out
windows. Everything random comes from `seed` (model init via torch.manual_seed, batches via their own Generator),
and torch runs on `threads` threads, so the same corpus, config and torch build give the same weights bit for bit.

Files written to `out` (Meta layout, so `llama.load_model(out)` and `llama.Tokenizer.from_file(out)` read them):
    params.json  consolidated.00.pth  tokenizer.model  heldout.txt  train_info.json  train_config.json

Ctrl-C (SIGINT) or SIGTERM finishes the current step and writes `out/checkpoint.pt` (model, optimizer, batch
sampler state, history); `--resume` continues from it bit for bit and deletes it once the run is done.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from llama.cli import REPO, UserError, atomic_write_bytes, atomic_write_json, config_to_dict, progress_bar
from llama.stop import StopSignals
from llama.config import ModelArgs
from llama.model import Transformer
from llama.tiny.corpus import build_corpus, corpus_from_file, token_stream, train_sentencepiece


DEFAULT_OUT = "weights/tiny"


@dataclass
class TrainConfig:
    out: str = field(default=DEFAULT_OUT, metadata={"help": "output folder (Meta layout; the default is the "
                                                            "checkout's weights/tiny from any folder)"})
    corpus: str = field(default="stdlib", metadata={"help": "'stdlib' (CPython docstrings + pydoc topics) or a "
                                                             "UTF-8 .txt file, one document per line"})
    seed: int = 1337
    threads: int = field(default=1, metadata={"help": "torch threads; results are reproducible for a fixed value"})
    # model (Llama architecture: RMSNorm, RoPE, GQA, SwiGLU, tied embeddings)
    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    multiple_of: int = 128
    rope_theta: float = 10000.0
    # optimisation
    seq_len: int = field(default=256, metadata={"help": "training window T (also the model's max_seq_len)"})
    batch_size: int = 8
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to lr * min_lr_ratio"})
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_windows: int = field(default=64, metadata={"help": "held-out (and train) windows per evaluation; 0 = all"})
    sample_tokens: int = field(default=48, metadata={"help": "greedy sample length printed at the end (0 = none)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.pt (written on Ctrl-C)"})


class TrainResult(NamedTuple):
    model: Transformer
    info: dict  # what train_info.json holds ({} when the run was stopped early)
    stopped: str = ""  # the signal that stopped the run after a checkpoint (SIGINT / SIGTERM), "" when it finished


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, cfg: TrainConfig, step: int, model: Transformer, opt: torch.optim.Optimizer,
                    gen: torch.Generator, history: list[dict], tokenizer_sha: str) -> None:
    buf = io.BytesIO()
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "gen": gen.get_state(),
                "history": history, "config": config_to_dict(cfg), "tokenizer_sha256": tokenizer_sha}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, cfg: TrainConfig, tokenizer_sha: str) -> dict:
    """The checkpoint of an interrupted run with this same config (an error naming what differs otherwise)."""
    if not path.is_file():
        raise UserError(f"--resume: nothing to resume, {path} does not exist; drop --resume to start a new run")
    try:
        ck = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: unreadable checkpoint ({e})") from e
    ours = {k: v for k, v in config_to_dict(cfg).items() if k != "resume"}
    diff = [f"--{k.replace('_', '-')} {ck['config'].get(k)!r} -> {v!r}" for k, v in ours.items()
            if ck["config"].get(k) != v]
    if diff:
        raise UserError(f"--resume: {path} is a run with other settings ({'; '.join(diff)}); resume with its "
                        f"settings or start over without --resume")
    if ck["tokenizer_sha256"] != tokenizer_sha:
        raise UserError(f"--resume: {path} was trained with another tokenizer (the corpus changed); start over")
    return ck


def model_args(cfg: TrainConfig, vocab_size: int) -> ModelArgs:
    return ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                     vocab_size=vocab_size, multiple_of=cfg.multiple_of, rope_theta=cfg.rope_theta,
                     use_scaled_rope=False, max_seq_len=cfg.seq_len, tie_embeddings=True)


def init_weights(model: Transformer) -> None:
    """GPT-2 init: N(0, 0.02) everywhere, output projections of each residual branch (wo, w2) scaled down by
    sqrt(2 * n_layers) so the residual stream does not grow with depth; RMSNorm weights stay 1."""
    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() == 2:
            scaled = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
            torch.nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * model.args.n_layers) if scaled else std)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over `warmup` steps, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def get_batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """B random windows of T+1 tokens: inputs x = window[:-1], targets y = window[1:], both (B, T)."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=gen)
    windows = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def eval_windows(stream: torch.Tensor, seq_len: int, limit: int) -> torch.Tensor:
    """Non-overlapping (T+1)-windows (sharing one boundary token) spread evenly over the stream: (N, T+1)."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise UserError(f"a token stream of {len(stream)} tokens is shorter than one window of seq_len={seq_len}")
    idx = torch.arange(n) if limit <= 0 or limit >= n else torch.linspace(0, n - 1, limit).round().long()
    return torch.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in idx.tolist()])


@torch.no_grad()
def mean_loss(model: Transformer, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over every target position of the windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        logits = model(w[:, :-1]).logits.float()  # (B, T, N)
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


def unigram_loss(train_tokens: list[int], targets: list[int], vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `targets` under the add-one-smoothed unigram distribution of `train_tokens`:
    the loss of a model that ignores context, the floor a real language model must beat."""
    counts = Counter(train_tokens)
    total = len(train_tokens) + vocab_size
    return -sum(math.log((counts[t] + 1) / total) for t in targets) / len(targets)


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of the tensors themselves (names, dtypes, shapes, values), independent of the file format."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def train(cfg: TrainConfig) -> TrainResult:
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    out = REPO / DEFAULT_OUT if cfg.out == DEFAULT_OUT else Path(cfg.out)  # the embedded model's folder

    # 1. corpus and tokenizer
    print(f"corpus: {cfg.corpus}")
    corpus = build_corpus() if cfg.corpus == "stdlib" else corpus_from_file(cfg.corpus)
    print(f"  {corpus.info['train_documents']} train / {corpus.info['heldout_documents']} held-out documents, "
          f"sha256 {corpus.info['sha256'][:16]}")
    import sentencepiece as spm

    sp_bytes = train_sentencepiece(corpus.train, cfg.vocab_size, where=cfg.corpus)
    sp_sha = hashlib.sha256(sp_bytes).hexdigest()
    ck = load_checkpoint(out / CHECKPOINT, cfg, sp_sha) if cfg.resume else None
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    train_list, val_list = token_stream(sp, corpus.train), token_stream(sp, corpus.heldout)
    train_stream, val_stream = torch.tensor(train_list), torch.tensor(val_list)
    if len(train_stream) < cfg.seq_len + 2:
        raise UserError(f"{cfg.corpus}: {len(train_stream)} training tokens; need more than seq_len={cfg.seq_len}")
    print(f"  tokens: {len(train_stream)} train, {len(val_stream)} held-out (vocab {sp.vocab_size()})")
    val_w = eval_windows(val_stream, cfg.seq_len, cfg.eval_windows)
    train_w = eval_windows(train_stream, cfg.seq_len, cfg.eval_windows)
    unigram = unigram_loss(train_list, val_w[:, 1:].flatten().tolist(), sp.vocab_size())

    # 2. model and optimiser
    torch.manual_seed(cfg.seed)
    args = model_args(cfg, sp.vocab_size())
    model = Transformer(args)
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; norms' gains are not decayed
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, history = 0, []
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["gen"])
        start, history = int(ck["step"]), list(ck["history"])
        print(f"resuming from {out / CHECKPOINT} at step {start} of {cfg.steps}")
    print(f"model: {n_params / 1e6:.2f}M parameters, {args.n_layers} layers, dim {args.dim}, "
          f"{args.n_heads} heads / {args.n_kv_heads} kv heads, ffn {args.ffn_hidden_dim}; "
          f"unigram baseline on held-out: {unigram:.4f} nats/token")

    # 3. the loop (a signal ends it after the current step, with a checkpoint)
    bar = progress_bar(range(start, cfg.steps), desc="train", unit="step", dynamic_ncols=True, total=cfg.steps,
                       initial=start)
    done = start
    with StopSignals() as stop:
        for step in bar:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = get_batch(train_stream, cfg.batch_size, cfg.seq_len, gen)
            logits = model(x).logits  # (B, T, N)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)  # drawn with the bar
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                val = mean_loss(model, val_w)
                history.append({"step": step + 1, "train_batch_loss": round(loss.item(), 4), "val_loss": round(val, 4)})
                bar.write(f"step {step + 1}: batch loss {loss.item():.4f}, held-out loss {val:.4f} "
                          f"(unigram {unigram:.4f})")
            done = step + 1
            if stop:
                break
    bar.close()
    if stop and done < cfg.steps:
        save_checkpoint(out / CHECKPOINT, cfg, done, model, opt, gen, history, sp_sha)
        print(f"stopped by {stop.name} after step {done} of {cfg.steps}; checkpoint written to "
              f"{out / CHECKPOINT}", flush=True)
        return TrainResult(model, {}, stopped=stop.name)
    model.eval()
    train_loss, val_loss = mean_loss(model, train_w), mean_loss(model, val_w)
    wall = time.time() - t0

    # 4. files (Meta layout)
    state = model.state_dict()  # tied: output.weight shares tok_embeddings' storage, stored once
    buf = io.BytesIO()
    torch.save(state, buf)
    info = {
        "corpus": corpus.info,
        "tokens": {"train": len(train_stream), "heldout": len(val_stream)},
        "tokenizer": {"type": "sentencepiece-bpe", "vocab_size": sp.vocab_size(), "sha256": sp_sha},
        "params": n_params,
        "seed": cfg.seed,
        "threads": cfg.threads,
        "steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "final_train_loss": round(train_loss, 4),
        "final_val_loss": round(val_loss, 4),
        "unigram_val_loss": round(unigram, 4),
        "loss_unit": "nats/token (mean next-token cross-entropy over eval windows of seq_len tokens)",
        "eval_windows": {"heldout": len(val_w), "train": len(train_w), "seq_len": cfg.seq_len},
        "history": history,
        "weights_sha256": weights_sha256(state),
        "torch_version": torch.__version__,
        "wall_time_s": round(wall, 1),
        "config": {k: v for k, v in config_to_dict(cfg).items() if k != "resume"},
    }
    atomic_write_json(out / "params.json", args.to_params())
    atomic_write_bytes(out / "consolidated.00.pth", buf.getvalue())
    atomic_write_bytes(out / "tokenizer.model", sp_bytes)
    atomic_write_bytes(out / "heldout.txt", "".join(d + "\n" for d in corpus.heldout).encode("utf-8"))
    atomic_write_json(out / "train_config.json", info["config"])
    atomic_write_json(out / "train_info.json", info)
    (out / CHECKPOINT).unlink(missing_ok=True)  # the run is complete: its files are the result
    print(f"done in {wall:.0f}s: train loss {train_loss:.4f}, held-out loss {val_loss:.4f}, "
          f"unigram {unigram:.4f} nats/token -> {out}")
    if cfg.sample_tokens > 0:
        print("greedy sample:", greedy_text(model, sp, "Return the", cfg.sample_tokens))
    return TrainResult(model, info)


@torch.no_grad()
def greedy_text(model: Transformer, sp: "object", prompt: str, n: int) -> str:
    """Greedy continuation without a KV cache (a sanity check; llama.generate is the real decoder)."""
    ids = [sp.bos_id()] + sp.encode(prompt)  # type: ignore[attr-defined]
    for _ in range(n):
        nxt = int(model(torch.tensor([ids[-model.args.max_seq_len:]])).logits[0, -1].argmax())
        if nxt == sp.eos_id():  # type: ignore[attr-defined]
            break
        ids.append(nxt)
    return sp.decode(ids[1:])  # type: ignore[attr-defined]


def load_info(folder: str | Path) -> dict:
    p = Path(folder) / "train_info.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: cannot read training record ({e})") from None
