"""Test fixtures for capture/store tests: a random-weight Llama saved in Meta layout, with its own tiny
SentencePiece tokenizer trained on a few KB of generated English, and a corpus of documents for it."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

import llama

SUBJECTS = ["The committee", "Dr. Smith", "A small dog", "The old library", "Mrs. Jones", "Our team", "The river",
            "Each student", "The U.S. Army", "Prof. Brown"]
VERBS = ["reported", "found", "carried", "described", "measured", "painted", "visited", "opened", "wrote about",
         "ignored"]
OBJECTS = ["the results", "a new bridge", "3.5 kilograms of flour", "the north wall", "several letters",
           "the quiet valley", "a broken clock", "the morning train", "two old maps", "the final chapter"]
ENDINGS = [".", ".", ".", "!", "?", "...", '."', "."]


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.3:
        s += f" in {rng.randint(1800, 2024)}"
    end = rng.choice(ENDINGS)
    return ('"' + s + end) if end == '."' else s + end


def documents(n: int, seed: int = 0, min_sent: int = 1, max_sent: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(min_sent, max_sent))) for _ in range(n)]


def train_tokenizer(path: Path, vocab_size: int = 160) -> None:
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(documents(400, seed=123)), model_writer=buf,
                                   vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path.write_bytes(buf.getvalue())


def make_model_dir(folder: Path, dim: int = 64, n_layers: int = 3, seed: int = 0) -> Path:
    """params.json + consolidated.00.pth (random weights) + tokenizer.model, the Meta layout our loader reads."""
    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder / "tokenizer.model")
    vocab = llama.Tokenizer.from_file(folder / "tokenizer.model").n_words
    params = {"dim": dim, "n_layers": n_layers, "n_heads": 4, "n_kv_heads": 2, "vocab_size": vocab,
              "multiple_of": 16, "norm_eps": 1e-5, "rope_theta": 10000.0}
    (folder / "params.json").write_text(json.dumps(params))
    torch.manual_seed(seed)
    model = llama.Transformer(llama.ModelArgs.from_params(params))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3 if p is model.tok_embeddings.weight else 1.0 / p.shape[1] ** 0.5)
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    return folder


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    path.write_text("\n".join(documents(n_docs, seed)) + "\n")
    return path


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a store (relative name -> bytes); temp files of killed runs are not part of a store."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and not p.name.endswith(".tmp")}
