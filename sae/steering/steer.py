"""Steering: splice an SAE into the model at its capture point and add to / clamp chosen latents.

    splice = SAESplice(sae, [Steer(123, 8.0), Steer(42, 0.0, "clamp")])
    model(tokens, edit={sae.cfg.hook_name: splice})

At the hook the residual x is replaced by

    x' = x_hat(steered code) + (x - x_hat(clean code))      # default: the SAE's error term is kept
    x' = x_hat(steered code)                                 # error_term=False: pure reconstruction (fidelity)

computed as x + (x_hat(steered) - x_hat(clean)), so with no steering x' is x itself and the logits are exactly the
clean model's. The code is the SAE's sparse (top_acts, top_indices); a steer changes one latent's value:
"add" adds `strength` to it (the latent need not be active), "clamp" sets it to `strength` (0 ablates it).
Because decoding is linear in the code, "add" moves x by strength * (the latent's decoder direction in raw space).

The SAE's own `SAE.steer` dict (latent -> (value, mode), applied inside `encode`) is the same operation at a
lower level; the splice cannot use it directly because the error term needs the clean code as well, so it encodes
with `SAE.steer` switched off and applies its steers with `steer_code`.
Steering API: a list of `Steer(latent, strength, mode)` given to
`SAESplice`; `parse_steer("123:8")`, `parse_steer("golden gate:10:clamp", labels)` build them from text.
`rows` limits steering to some rows of the batch (the web UI generates steered and unsteered side by side in one
batch). With `record > 0` the splice keeps, for the last position of every row of the latest call, the `record`
most active latents of that row's code (steered rows: the steered code; rows left unsteered by `rows`: their clean
code): the latents active where that row's next token is chosen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from llama.cli import UserError

MODES = ("add", "clamp")
MAX_STRENGTH = 1e4


@dataclass(frozen=True)
class Steer:
    latent: int
    strength: float
    mode: str = "add"  # add | clamp

    def validate(self, n_latents: int) -> "Steer":
        if not 0 <= self.latent < n_latents:
            raise UserError(f"steer latent must be in [0, {n_latents}), got {self.latent}")
        if self.mode not in MODES:
            raise UserError(f"steer mode must be one of {MODES}, got {self.mode!r}")
        if not abs(self.strength) <= MAX_STRENGTH:  # also rejects nan
            raise UserError(f"steer strength must be a number in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], "
                            f"got {self.strength}")
        return self


class ActiveLatents(NamedTuple):
    values: Tensor  # [B, r] activation, descending
    indices: Tensor  # [B, r] latent ids


def _field(lab: Any, key: str, default: Any = None) -> Any:
    """A labels-table entry is a Label NamedTuple (sae.analysis.interpret) or the raw labels.json dict."""
    return lab.get(key, default) if isinstance(lab, Mapping) else getattr(lab, key, default)


def label_of(labels: Mapping[int, Any] | None, latent: int) -> str:
    lab = (labels or {}).get(latent)
    return str(_field(lab, "label", "") or "") if lab is not None else ""


def find_latents(query: str, labels: Mapping[int, Any]) -> list[int]:
    """Latents whose label (or description) contains `query` (case-insensitive), best first: label matches
    before description matches, then by detection score, then by confidence."""
    q = query.strip().lower()
    if not q:
        return []
    hits = []
    for latent, lab in labels.items():
        label, desc = str(_field(lab, "label", "")).lower(), str(_field(lab, "description", "")).lower()
        if q in label or q in desc:
            score = _field(lab, "detection_score")
            hits.append((q not in label, -(score if score is not None else -1.0),
                         -float(_field(lab, "confidence", 0.0) or 0.0), latent))
    return [h[-1] for h in sorted(hits)]


def parse_steer(spec: str, labels: Mapping[int, Any] | None = None) -> Steer:
    """'TARGET:STRENGTH[:MODE]' -> Steer. TARGET is a latent index or text searched in the labels table."""
    if ":" not in spec:
        raise UserError(f"--steer {spec!r}: expected TARGET:STRENGTH[:add|clamp], e.g. 123:8 or 'dogs:6:clamp'")
    parts = spec.rsplit(":", 2)
    mode = "add"
    if len(parts) == 3 and parts[2].strip().lower() in MODES:
        target, strength_s, mode = parts[0], parts[1], parts[2].strip().lower()
    else:
        target, _, strength_s = spec.rpartition(":")
    try:
        strength = float(strength_s)
    except ValueError:
        raise UserError(f"--steer {spec!r}: expected TARGET:STRENGTH[:add|clamp] with a numeric strength, e.g. "
                        "123:8 or 'dogs:6:clamp'") from None
    target = target.strip()
    if not target:
        raise UserError(f"--steer {spec!r}: missing the latent index or label text before ':'")
    if target.lstrip("-").isdigit():
        return Steer(int(target), strength, mode)
    if not labels:
        raise UserError(f"--steer {spec!r}: {target!r} is not a latent index and no labels table was given "
                        "(--labels FILE from scripts/interpret.py)")
    found = find_latents(target, labels)
    if not found:
        raise UserError(f"--steer {spec!r}: no latent label contains {target!r}")
    return Steer(found[0], strength, mode)


def steer_code(acts: Tensor, idx: Tensor, steers: Sequence[Steer]) -> tuple[Tensor, Tensor]:
    """Apply the steers to a sparse code [N, k] -> [N, k + len(steers)]: each steered latent is removed from
    the kept set and appended as one extra column holding its new value (current + s, or s)."""
    acts = acts.clone()
    extra_acts, extra_idx = [], []
    for s in steers:
        hit = idx == s.latent
        current = (acts * hit).sum(-1)
        acts = acts.masked_fill(hit, 0.0)
        extra_acts.append(current + s.strength if s.mode == "add" else torch.full_like(current, s.strength))
        extra_idx.append(torch.full_like(idx[:, 0], s.latent))
    if not steers:
        return acts, idx
    return torch.cat([acts, torch.stack(extra_acts, 1)], 1), torch.cat([idx, torch.stack(extra_idx, 1)], 1)


def clean_encode(sae: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """The SAE's code for x [N, D] with the SAE's own `steer` dict switched off (the error term needs the
    clean code; steering is applied on top of it by `steer_code`)."""
    saved = getattr(sae, "steer", None)
    if saved:
        sae.steer = {}
    try:
        out = sae.encode(x)
    finally:
        if saved:
            sae.steer = saved
    return out[0], out[1]


def top_active(acts: Tensor, idx: Tensor, r: int) -> ActiveLatents:
    """The r largest entries of a sparse code [N, k] (duplicates of one latent summed), descending."""
    n = int(idx.max().item()) + 1 if idx.numel() else 1
    dense = torch.zeros(acts.shape[0], n, dtype=acts.dtype, device=acts.device).scatter_add_(1, idx, acts)
    values, indices = torch.topk(dense, min(r, n), dim=-1)
    return ActiveLatents(values, indices)


SINK_NORM_RATIO = 10.0  # attention sinks sit ~100x the median residual norm (SmolLM2 layer 15); ordinary rows < ~3x


def sink_rows(sae: Any, flat: Tensor) -> Tensor | None:
    """[N] bool: rows the SAE never trained on, the attention sinks (position 0, BOS / <|endoftext|>), told by their
    norm: above SINK_NORM_RATIO x the typical norm (sqrt(d) / s for a scalar-normalised SAE, else this call's median
    row norm when it has >= 16 rows). None when there is nothing to compare with."""
    norms = flat.float().norm(dim=-1)
    if sae.cfg.normalize == "scalar" and float(sae.norm_scale) != 1.0:
        typical = flat.shape[-1] ** 0.5 / float(sae.norm_scale)
    elif flat.shape[0] >= 16:
        typical = float(norms.median())
    else:
        return None
    return norms > SINK_NORM_RATIO * typical


class SAESplice:
    """The `edit` function x [B, T, D] -> x' for the SAE's hook point (see the module docstring).

    spare_sinks (default): attention-sink rows (`sink_rows`) keep x exactly: the SAE never saw them in training, and
    replacing one by its reconstruction (error_term=False) wrecks every later prediction."""

    def __init__(self, sae: Any, steers: Sequence[Steer] = (), *, error_term: bool = True,
                 rows: Sequence[bool] | None = None, record: int = 0, spare_sinks: bool = True) -> None:
        n_latents = sae.W_dec.shape[0]
        self.sae, self.steers = sae, [s.validate(n_latents) for s in steers]
        self.error_term, self.record, self.spare_sinks = error_term, record, spare_sinks
        self.rows = None if rows is None else torch.tensor(list(rows), dtype=torch.bool)
        self.last: ActiveLatents | None = None  # filled when record > 0

    def __call__(self, x: Tensor) -> Tensor:
        if not self.steers and self.error_term and not self.record:
            return x  # nothing to change: exactly the clean model
        B, T, D = x.shape
        param = self.sae.W_dec
        flat = x.reshape(B * T, D).to(param.dtype)
        with torch.no_grad():
            acts, idx = clean_encode(self.sae, flat)
            acts2, idx2 = steer_code(acts, idx, self.steers)
            if self.record:  # each row's own code where its next token is chosen: steered rows the steered one
                last = (torch.arange(B, device=x.device) * T + T - 1)
                rec_acts, rec_idx = acts2[last], idx2[last]
                if self.rows is not None and self.steers:  # unsteered rows list their clean code, never the steer
                    pad = (0, acts2.shape[1] - acts.shape[1])  # extra zero slots (a zero adds nothing)
                    keep = self.rows.to(x.device)[:B].view(B, 1)
                    rec_acts = torch.where(keep, rec_acts, torch.nn.functional.pad(acts[last], pad))
                    rec_idx = torch.where(keep, rec_idx, torch.nn.functional.pad(idx[last], pad))
                self.last = top_active(rec_acts, rec_idx, self.record)
            if not self.steers and self.error_term:
                return x
            steered = self.sae.decode(acts2, idx2, like=flat)
            plain = self.sae.decode(acts, idx, like=flat)
            out = (flat + (steered - plain) if self.error_term else steered).to(x.dtype).reshape(B, T, D)
        if self.rows is not None and self.error_term:  # unsteered rows keep x exactly
            keep = self.rows.to(x.device)[:B].view(B, 1, 1)
            out = torch.where(keep, out, x)
        elif self.rows is not None:
            keep = self.rows.to(x.device)[:B].view(B, 1, 1)
            out = torch.where(keep, out, plain.to(x.dtype).reshape(B, T, D))
        sinks = sink_rows(self.sae, flat) if self.spare_sinks else None
        if sinks is not None:  # the attention sinks keep x exactly, in every row
            out = torch.where(sinks.view(B, T, 1), x, out)
        return out


# ---- generation -------------------------------------------------------------------------------------------------
class SteeredToken(NamedTuple):
    index: int  # which row of the batch
    token: int  # new token id (the stop token itself when stop_reason == "stop")
    text: str  # new text for the row (may be "" while a UTF-8 character is incomplete)
    stop_reason: str | None  # None | "stop" | "length"
    latents: list[tuple[int, float]]  # most active (latent, activation) where this token was chosen


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool = False, system: str | None = None
                   ) -> list[list[int]]:
    """Plain text (BOS + text) or one user turn in the model's chat format (Llama 3's or ChatML) per prompt; a
    tokenizer without chat tokens (a base model) gets plain text (scripts warn: `llama.chat.no_chat_warning`)."""
    from llama.chat import chat_format
    fmt = chat_format(tokenizer) if chat else None
    if fmt is None:
        return [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    head = [{"role": "system", "content": system}] if system else []
    return [fmt.encode_dialog_prompt(head + [{"role": "user", "content": p}]) for p in prompts]


def steered_stream(model: Any, tokenizer: Any, sae: Any, prompts: Sequence[Sequence[int]], steers: Sequence[Steer],
                   max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   error_term: bool = True, rows: Sequence[bool] | None = None, record: int = 0,
                   ) -> Iterator[SteeredToken]:
    """Generate from token-id prompts with the SAE spliced at its hook point; yield tokens as they come.
    `rows` (one bool per prompt) limits steering to some rows; `record` > 0 attaches the top latents per token."""
    from llama.generate import IncrementalDecoder, generate
    hook = sae.cfg.hook_name
    if not hook:
        raise UserError("this SAE's cfg.json has no hook_name: it does not say where in the model it belongs")
    if hook not in model.valid_points():
        raise UserError(f"the SAE's hook_name {hook!r} is not a point of this model (e.g. {model.valid_points()[0]})")
    if sae.cfg.d_in != model.args.dim:
        raise UserError(f"the SAE's d_in={sae.cfg.d_in} does not match the model's dim={model.args.dim}")
    splice = SAESplice(sae, steers, error_term=error_term, rows=rows, record=record)
    decoders = [IncrementalDecoder(tokenizer, p) for p in prompts]
    for ev in generate(model, tokenizer, prompts, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       edit={hook: splice}, stream=True):
        piece = decoders[ev.index].push(None if ev.stop_reason == "stop" else ev.token,
                                        final=ev.stop_reason is not None)
        latents: list[tuple[int, float]] = []
        if record and splice.last is not None:
            vals, ids = splice.last.values[ev.index].tolist(), splice.last.indices[ev.index].tolist()
            latents = [(i, v) for i, v in zip(ids, vals) if v > 0]
        yield SteeredToken(ev.index, ev.token, piece, ev.stop_reason, latents)


class Steering(NamedTuple):
    model: Any  # llama.Transformer
    tokenizer: Any  # llama.Tokenizer
    sae: Any  # sae.model.SAE
    labels: dict[int, Any]  # latent -> Label (empty when no labels table)


def load_steering(model_dir: str, sae_dir: str, labels: str = "", tokenizer: str = "", device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Steering:
    """Model + tokenizer + SAE (+ labels) for steering, checked to belong together."""
    from llama.checkpoint import load_model, resolve_model
    from llama.tokenizer import Tokenizer
    from sae.formats import load
    model_dir = str(resolve_model(model_dir))  # a path, or a name such as smollm2
    model = load_model(model_dir, device=device, dtype=dtype).eval()
    tok = Tokenizer.from_file(tokenizer or model_dir)
    sae = load(sae_dir, device=device).to(device).eval()
    if tok.n_words > model.args.vocab_size:
        raise UserError(f"tokenizer of {tokenizer or model_dir} has {tok.n_words} tokens, more than the model's "
                        f"vocab_size {model.args.vocab_size}")
    if sae.cfg.d_in != model.args.dim or sae.cfg.hook_name not in model.valid_points():
        raise UserError(f"--sae {sae_dir}: d_in={sae.cfg.d_in}, hook_name={sae.cfg.hook_name!r} do not fit the model "
                        f"{model_dir} (dim={model.args.dim})")
    table: dict[int, Any] = {}
    if labels:
        try:
            from sae.analysis.interpret import load_labels
            table = dict(load_labels(labels))
        except ImportError:  # the labels reader has not landed: the documented raw layout
            from sae.analysis.dashboard import read_labels
            from pathlib import Path
            table = read_labels(Path(labels))
    return Steering(model, tok, sae, table)
