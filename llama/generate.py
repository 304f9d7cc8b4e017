"""Generation: prefill + cached decode over a batch of prompts of different lengths, greedy or top-p sampling.

    out = generate(model, tok, [tok.encode("Once upon", bos=True, eos=False)], max_new_tokens=20)
    out.tokens[0], out.stop_reasons[0]                          # new ids (stop token excluded), "stop" | "length"
    for ev in generate(model, tok, prompts, 20, stream=True):   # TokenEvent(index, token, stop_reason) as they come
        ...
    text_completion(model, tok, ["Once upon"], 20)              # [Completion(text, tokens, stop_reason)]
    chat_completion(model, tok, [[{"role": "user", "content": "Hi"}]], 20)

How a batch of uneven prompts is decoded (as Meta's reference does): the shared prefix up to the shortest prompt is
prefilled in one forward; then one position at a time for the whole batch. At position t a row whose prompt is
longer than t keeps its prompt token (the model's guess is discarded), other rows keep the sampled token. Every
row thus sees exactly the tokens it would see alone, so batched greedy output equals one-by-one output.
`edit` (capture-point name -> fn) is applied at every forward, prefill and decode alike (steering).
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import torch

from llama.chat import ChatFormat, Message, chat_format
from llama.cli import UserError
from llama.model import Transformer
from llama.tokenizer import Tokenizer

Edit = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]


class TokenEvent(NamedTuple):
    index: int  # which prompt
    token: int  # the new token (when stop_reason == "stop", it is the stop token itself, not part of the output)
    stop_reason: str | None  # None: more may follow; "stop": a stop token ended the row; "length": budget spent


class GenerationOutput(NamedTuple):
    tokens: list[list[int]]  # new tokens per prompt, stop token excluded
    stop_reasons: list[str]  # "stop" | "length" per prompt


class Completion(NamedTuple):
    text: str
    tokens: list[int]
    stop_reason: str


class TextChunk(NamedTuple):
    index: int
    text: str  # new text for prompt `index` (may be "" on the final chunk)
    stop_reason: str | None


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter [.., V] -> [.., V]: keep the most likely tokens until their mass reaches top_p (a token is kept
    when the mass strictly before it is <= top_p, as in Meta's sample_top_p), zero the rest, renormalise."""
    if top_p >= 1.0:
        return probs
    p_sorted, idx = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(p_sorted, dim=-1) - p_sorted  # mass of the tokens ranked above each one
    p_sorted = p_sorted.masked_fill(before > top_p, 0.0)
    p_sorted = p_sorted / p_sorted.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, idx, p_sorted)  # back to vocabulary order


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]: argmax when temperature == 0, else top-p sampling of softmax(logits/T)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _check_args(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                top_p: float) -> None:
    if not prompts:
        raise UserError("generate: no prompts given")
    if max_new_tokens < 1:
        raise UserError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    V, max_seq = model.args.vocab_size, model.args.max_seq_len
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"generate: prompt {i} is empty (encode it with bos=True)")
        if len(p) >= max_seq:
            raise UserError(f"generate: prompt {i} has {len(p)} tokens; the model's max_seq_len is {max_seq}")
        if min(p) < 0 or max(p) >= V:
            raise UserError(f"generate: prompt {i} has token ids outside [0, {V}) (tokenizer/model mismatch?)")


@torch.inference_mode()
def _stream(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
            top_p: float, seed: int | None, stop_tokens: set[int], edit: Edit | None) -> Iterator[TokenEvent]:
    device = model.tok_embeddings.weight.device
    B, lens = len(prompts), [len(p) for p in prompts]
    total = min(model.args.max_seq_len, max(lens) + max_new_tokens)  # positions the cache must hold
    tokens = torch.zeros(B, total, dtype=torch.long, device=device)  # (B, total): prompts, then new tokens
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    in_prompt = torch.arange(total, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]  # (B, total)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    n_new, done = [0] * B, [False] * B

    model.setup_caches(B, total)
    try:
        prev = 0
        for cur in range(min(lens), total):
            # feed tokens [prev, cur) (the whole shared prefix at first, then one position), predict position cur
            logits = model(tokens[:, prev:cur], prev, edit=edit, last_only=True).logits[:, -1]  # (B, V)
            nxt = sample_next(logits, temperature, top_p, generator)
            tokens[:, cur] = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)  # prompt tokens win
            for i, tok in enumerate(tokens[:, cur].tolist()):
                if done[i] or cur < lens[i]:
                    continue
                n_new[i] += 1
                reason = "stop" if tok in stop_tokens else \
                    "length" if n_new[i] == max_new_tokens or cur == total - 1 else None
                done[i] = reason is not None
                yield TokenEvent(i, tok, reason)
            if all(done):
                break
            prev = cur
    finally:
        model.clear_caches()


def generate(model: Transformer, tokenizer: Tokenizer | None, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop_tokens: set[int] | None = None, edit: Edit | None = None,
             stream: bool = False) -> GenerationOutput | Iterator[TokenEvent]:
    """Continue each prompt (token ids) by up to max_new_tokens tokens; stop a row at any of `stop_tokens`
    (default: the tokenizer's). stream=True returns an iterator of TokenEvent instead of waiting for the end."""
    _check_args(model, prompts, max_new_tokens, temperature, top_p)
    if stop_tokens is None:
        stop_tokens = tokenizer.stop_tokens if tokenizer is not None else set()
    events = _stream(model, prompts, max_new_tokens, temperature, top_p, seed, set(stop_tokens), edit)
    if stream:
        return events
    out: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    for ev in events:
        if ev.stop_reason != "stop":
            out[ev.index].append(ev.token)
        if ev.stop_reason is not None:
            reasons[ev.index] = ev.stop_reason
    return GenerationOutput(out, reasons)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces; holds back an incomplete UTF-8 character ('\\ufffd'
    at the end) until the tokens that complete it arrive."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        # decoding after the prompt's tokens keeps word-boundary spaces (SentencePiece drops a leading one)
        self.tokenizer, self.tokens = tokenizer, list(context)
        self.emitted = self.start = tokenizer.decode(self.tokens) if self.tokens else ""

    def push(self, token: int | None, final: bool = False) -> str:
        if token is not None:
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if (text.endswith("\ufffd") and not final) or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    @property
    def text(self) -> str:
        """Everything decoded after the context so far."""
        return self.emitted[len(self.start):]


def _decode_after(tokenizer: Tokenizer, context: Sequence[int], tokens: list[int]) -> str:
    dec = IncrementalDecoder(tokenizer, context)
    dec.tokens += tokens
    full = tokenizer.decode(dec.tokens)
    return full[len(dec.start):] if full.startswith(dec.start) else tokenizer.decode(tokens)


def _complete(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], max_new_tokens: int,
              stream: bool, **kw) -> list[Completion] | Iterator[TextChunk]:
    if stream:
        return _stream_text(model, tokenizer, prompts, max_new_tokens, **kw)
    out = generate(model, tokenizer, prompts, max_new_tokens, **kw)
    return [Completion(_decode_after(tokenizer, p, t), t, r) for p, t, r in zip(prompts, out.tokens, out.stop_reasons)]


def _stream_text(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], max_new_tokens: int,
                 **kw) -> Iterator[TextChunk]:
    decoders = [IncrementalDecoder(tokenizer, p) for p in prompts]
    for ev in generate(model, tokenizer, prompts, max_new_tokens, stream=True, **kw):
        dec = decoders[ev.index]
        piece = dec.push(None if ev.stop_reason == "stop" else ev.token, final=ev.stop_reason is not None)
        if piece or ev.stop_reason is not None:
            yield TextChunk(ev.index, piece, ev.stop_reason)


def text_completion(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, *,
                    stream: bool = False, **kw) -> list[Completion] | Iterator[TextChunk]:
    """Continue plain-text prompts (encoded with BOS). kw: temperature, top_p, seed, stop_tokens, edit."""
    ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    return _complete(model, tokenizer, ids, max_new_tokens, stream, **kw)


def chat_completion(model: Transformer, tokenizer: Tokenizer, dialogs: Sequence[Sequence[Message]],
                    max_new_tokens: int = 256, *, stream: bool = False, **kw) -> list[Completion] | Iterator[TextChunk]:
    """Answer each dialog ([{"role", "content"}, ...]) as the assistant, in the model's chat format (Llama 3's or
    ChatML, `llama.chat.chat_format`)."""
    fmt = chat_format(tokenizer) or ChatFormat(tokenizer)  # no chat tokens: ChatFormat says what is missing
    ids = [fmt.encode_dialog_prompt(d) for d in dialogs]
    return _complete(model, tokenizer, ids, max_new_tokens, stream, **kw)
