"""Measured steering check: steering a latent tied to a token raises that token's frequency in sampled completions.

    target = pick_target(model, sae, exclude=tok.stop_tokens)          # latent whose decoder most promotes a token
    eff = measure_steering(model, tok, sae, prompts, target, strength=8, seeds=range(16), max_new_tokens=32)
    eff.rate_clean, eff.rate_steered, eff.cohens_d, eff.sign_p

The tie is read off the weights: the latent's decoder direction (raw space) through the final norm's weight and
the unembedding (the logit lens of sae/analysis), z-scored over the vocabulary. Every (prompt, seed) completion is
generated twice in one batch, steered and unsteered, with the same seed; the per-pair difference in target-token
count gives the effect size (Cohen's d of the paired differences) and a two-sided sign test.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple, Sequence

import torch

from llama.cli import UserError
from sae.steering.steer import Steer, steered_stream


class Target(NamedTuple):
    latent: int
    token: int
    zscore: float  # how far the token's logit effect stands above the latent's other tokens (in SDs)
    tokens: list[int]  # the latent's top promoted tokens ("topic"), target first


class Effect(NamedTuple):
    n_pairs: int
    tokens_clean: int  # generated tokens, unsteered / steered
    tokens_steered: int
    hits_clean: int  # target-token occurrences
    hits_steered: int
    topic_clean: int  # occurrences of any of the target's topic tokens
    topic_steered: int
    rate_clean: float  # hits / tokens
    rate_steered: float
    mean_diff: float  # mean over pairs of (steered count - clean count)
    cohens_d: float  # mean_diff / sd of the paired differences (inf when sd = 0 and mean > 0)
    wins: int  # pairs where steered > clean
    losses: int
    sign_p: float  # two-sided sign test over non-tied pairs


@torch.no_grad()
def decoder_logit_effects(model: Any, sae: Any) -> torch.Tensor:
    """[n_latents, vocab]: each latent's decoder direction (raw space) through norm.weight and the unembedding."""
    W = sae.W_dec.detach().float()
    if sae.cfg.normalize == "scalar":
        W = W / sae.norm_scale.float()
    return (W * model.norm.weight.float()) @ model.output.weight.float().T


def pick_target(model: Any, sae: Any, token: int | None = None, exclude: Iterable[int] = (), topic: int = 10) -> Target:
    """The (latent, token) pair with the most specific promotion: z-score of the token among the latent's effects.
    With `token` given, the latent that promotes that token most specifically."""
    eff = decoder_logit_effects(model, sae)
    z = (eff - eff.mean(1, keepdim=True)) / eff.std(1, keepdim=True).clamp_min(1e-12)
    bad = [t for t in exclude if 0 <= t < z.shape[1]]
    if bad:
        z[:, bad] = float("-inf")
    if token is not None:
        if not 0 <= token < z.shape[1] or token in bad:
            raise UserError(f"--token {token}: not a usable token id of this model (vocab {z.shape[1]})")
        latent = int(z[:, token].argmax())
    else:
        flat = int(z.argmax())
        latent, token = divmod(flat, z.shape[1])
    top = z[latent].topk(topic).indices.tolist()
    return Target(latent, int(token), float(z[latent, token]), [int(token)] + [t for t in top if t != token])


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial sign test, p under H0 (wins ~ Bin(wins + losses, 1/2))."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = max(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n)


def measure_steering(model: Any, tokenizer: Any, sae: Any, prompts: Sequence[Sequence[int]], target: Target,
                     strength: float, seeds: Iterable[int], max_new_tokens: int = 32, temperature: float = 1.0,
                     top_p: float = 1.0, mode: str = "add", progress: Any = None) -> Effect:
    """Sample every prompt once per seed, steered and unsteered (same batch, same seed); count the target."""
    n = len(prompts)
    per_pair: list[tuple[int, int]] = []
    tot = {"c": 0, "s": 0}
    hits = {"c": 0, "s": 0}
    topic = {"c": 0, "s": 0}
    topic_set = set(target.tokens)
    for seed in seeds:
        counts = [0] * (2 * n)
        for ev in steered_stream(model, tokenizer, sae, list(prompts) * 2, [Steer(target.latent, strength, mode)],
                                 max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                 rows=[True] * n + [False] * n):
            if ev.stop_reason == "stop":
                continue
            side = "s" if ev.index < n else "c"
            tot[side] += 1
            hits[side] += ev.token == target.token
            topic[side] += ev.token in topic_set
            counts[ev.index] += ev.token == target.token
        per_pair += [(counts[i], counts[n + i]) for i in range(n)]
        if progress is not None:
            progress.update(1)
    diffs = [s - c for s, c in per_pair]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1))
    d = mean / sd if sd > 0 else (math.inf if mean > 0 else 0.0)
    wins, losses = sum(x > 0 for x in diffs), sum(x < 0 for x in diffs)
    return Effect(len(per_pair), tot["c"], tot["s"], hits["c"], hits["s"], topic["c"], topic["s"],
                  hits["c"] / max(1, tot["c"]), hits["s"] / max(1, tot["s"]), mean, d, wins, losses,
                  sign_test(wins, losses))


def steering_check(model: Any, tokenizer: Any, sae: Any, docs: Sequence[str], strength: float, *,
                   target: Target | None = None, n_prompts: int = 8, prompt_tokens: int = 8, seeds: int = 8,
                   max_new_tokens: int = 24, progress: Any = None) -> dict:
    """The measured check in one call, as the demo runs it: target = pick_target with the special tokens excluded
    (unless given), prompts = the first `prompt_tokens` tokens (BOS included) of the first `n_prompts` documents,
    every prompt sampled once per seed, steered and unsteered. Returns a JSON-ready dict: the target (ids and
    text), the strength, the prompts and the Effect's fields."""
    target = target or pick_target(model, sae, exclude=special_ids(tokenizer))
    prompts = [tokenizer.encode(d, bos=True, eos=False)[:prompt_tokens] for d in docs[:n_prompts]]
    if not prompts:
        raise UserError("steering check: no documents to take prompts from")
    eff = measure_steering(model, tokenizer, sae, prompts, target, strength, range(seeds), max_new_tokens,
                           progress=progress)
    return {"target": {**target._asdict(), "token_text": tokenizer.decode([target.token]),
                       "topic_text": [tokenizer.decode([t]) for t in target.tokens]},
            "strength": strength, "prompts": [tokenizer.decode(p) for p in prompts], **eff._asdict()}


def special_ids(tokenizer: Any) -> set[int]:
    """Ids a steering target must not be: BOS, the stop tokens and every special (control) token."""
    return set(getattr(tokenizer, "special_tokens", {}).values()) | set(tokenizer.stop_tokens) | {tokenizer.bos_id}
