"""Automated interpretation: one prompt per latent from its top contexts (activating tokens marked <<like this>>),
a JSON answer {label, description, confidence} parsed and validated, an optional detection score, all written to
a resumable latent -> label table (labels.json, rewritten atomically; layout in sae/analysis/README.md)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llama.cli import UserError, atomic_write_json, progress_bar
from sae.analysis.backends import (
    BACKENDS, AnthropicBackend, AnthropicBatchBackend, Backend, DryRunBackend, LlamaBackend, OpenAIBackend, Request,
)
from sae.analysis.http import HTTPClient, RateLimiter
from sae.analysis.parsing import Label, ParseError, parse_label
from sae.analysis.scoring import (
    DETECT_SYSTEM, detection_prompt, detection_sample, parse_detection, score_detection, split_counts,
)

LABELS_FORMAT = "llama-sae-labels/1"
EXPLAIN_SYSTEM = ("You are an interpretability researcher. You study one feature (a latent of a sparse autoencoder "
                  "trained on a language model's activations) from the text excerpts where it is most active, and "
                  "explain what it detects. Answer with JSON only.")


@dataclass
class InterpretConfig:
    """Flags of `scripts/interpret.py`."""
    analysis: str = field(default="runs/analysis", metadata={"help": "folder written by scripts/top_contexts.py"})
    out: str = field(default="", metadata={"help": "output folder for labels.json (default: --analysis)"})
    backend: str = field(default="dry-run", metadata={"help": "who writes the labels", "choices": list(BACKENDS)})
    dry_run: bool = field(default=False, metadata={"help": "only write the prompts (same as --backend dry-run)"})
    model: str = field(default="", metadata={"help": "API model name, or for --backend llama the checkpoint (folder, "
                                                    ".gguf file, or a name: smollm2)"})
    base_url: str = field(default="", metadata={"help": "API base URL (default: the vendor's; e.g. a local server)"})
    api_key_env: str = field(default="", metadata={"help": "env var holding the API key (default per backend)"})
    latents: list[int] = field(default_factory=list, metadata={"help": "latents to label (default: all with contexts)"})
    max_latents: int = field(default=0, metadata={"help": "label at most this many (0: no limit)"})
    sample: int = field(default=0, metadata={"help": "label a seeded random sample of this many latents (0: off), drawn "
                                                    "from those that fire on at most --max-freq of tokens with at "
                                                    "least --n-explain + --n-detect-pos top contexts"})
    max_freq: float = field(default=0.1, metadata={"help": "--sample: densest firing frequency drawn (0.1: not dense)"})
    n_explain: int = field(default=20, metadata={"help": "top contexts shown in the explanation prompt"})
    context_tokens: int = field(default=32, metadata={"help": "tokens of each context shown"})
    score: bool = field(default=True, metadata={"help": "compute the detection score of each label"})
    n_detect_pos: int = field(default=5, metadata={"help": "held-out activating contexts per detection prompt"})
    n_detect_neg: int = field(default=5, metadata={"help": "random non-activating contexts per detection prompt"})
    max_tokens: int = field(default=400, metadata={"help": "answer length limit"})
    prompt: str = field(default="json", metadata={"choices": ["json", "simple"], "help": "json: the JSON explanation "
                                                   "and detection prompts; simple (llama backend): a short question "
                                                   "with its answer begun, detection by yes/no logits, for small "
                                                   "models such as SmolLM2-135M (sae/analysis/interpret_small.py)"})
    temperature: float = 0.0
    timeout: float = field(default=60.0, metadata={"help": "seconds per HTTP attempt"})
    retries: int = field(default=5, metadata={"help": "retries on 429/5xx/timeouts (exponential backoff)"})
    backoff: float = field(default=2.0, metadata={"help": "first retry wait in seconds (doubles each time)"})
    requests_per_minute: float = field(default=0.0, metadata={"help": "rate limit (0: none)"})
    save_every: int = field(default=20, metadata={"help": "latents per round (one message batch per round)"})
    poll_interval: float = field(default=30.0, metadata={"help": "anthropic-batch: seconds between status polls"})
    batch_size: int = field(default=8, metadata={"help": "llama backend: prompts generated together"})
    device: str = field(default="cpu", metadata={"help": "llama backend: cpu | cuda"})
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dry_run:
            self.backend = "dry-run"
        for name in ("n_explain", "context_tokens", "max_tokens", "save_every", "batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.retries < 0 or self.timeout <= 0:
            raise UserError(f"--retries must be >= 0 and --timeout > 0, got {self.retries}, {self.timeout}")


def make_backend(cfg: InterpretConfig, out_dir: Path) -> Backend:
    client = HTTPClient(timeout=cfg.timeout, retries=cfg.retries, backoff=cfg.backoff,
                        limiter=RateLimiter(cfg.requests_per_minute))
    common = dict(client=client, max_tokens=cfg.max_tokens, temperature=cfg.temperature)
    if cfg.backend == "openai":
        return OpenAIBackend(cfg.model, cfg.base_url or "https://api.openai.com/v1",
                             cfg.api_key_env or "OPENAI_API_KEY", **common)
    if cfg.backend in ("anthropic", "anthropic-batch"):
        cls = AnthropicBatchBackend if cfg.backend == "anthropic-batch" else AnthropicBackend
        return cls(cfg.model, cfg.base_url or "https://api.anthropic.com", cfg.api_key_env or "ANTHROPIC_API_KEY",
                   poll_interval=cfg.poll_interval, **common)
    if cfg.backend == "llama":
        return LlamaBackend(cfg.model, cfg.device, cfg.max_tokens, cfg.temperature, cfg.batch_size, cfg.seed)
    return DryRunBackend(out_dir / "prompts.jsonl")


def highlight(rec: dict, max_tokens: int) -> str:
    """One context as text: the window of max_tokens around its top token, active tokens as <<token>>."""
    toks, acts, center = rec["tokens"], rec["acts"], rec["pos"] - rec["start"]
    s = min(max(0, center - (max_tokens * 3) // 4), max(0, len(toks) - max_tokens))
    parts = []
    for t, a in zip(toks[s:s + max_tokens], acts[s:s + max_tokens]):
        if a > 0 and t.strip():
            lead = t[:len(t) - len(t.lstrip())]
            parts.append(f"{lead}<<{t.strip()}>>")
        else:
            parts.append(t)
    return "".join(parts).strip()


def explain_prompt(rec: dict, n_shown: int, max_tokens: int) -> str:
    ctxs = rec["max"][:n_shown]
    top = max((c["score"] for c in ctxs), default=1.0) or 1.0
    lines = ["Excerpts where the feature is most active, strongest first. Tokens where it is active are marked "
             "<<like this>>; the number is the peak activation (10 = the strongest seen).", ""]
    lines += [f"{i + 1}. [{round(10 * c['score'] / top)}] {highlight(c, max_tokens)}" for i, c in enumerate(ctxs)]
    if rec.get("promoted"):
        lines += ["", "Tokens it makes more likely next: " + ", ".join(repr(p["token"]) for p in rec["promoted"][:10])]
    lines += ["", "What does this feature detect? Answer with JSON only, in this form:",
              '{"label": "<a short label, at most 8 words>", "description": "<one or two sentences>", '
              '"confidence": <a number from 0 to 1: how clear and consistent the pattern is>}']
    return "\n".join(lines)


def load_table(path: Path, what: str = "labels table") -> dict:
    """labels.json as a dict (an empty table when the file does not exist); anything else in its place is one
    error saying what is wrong with which file."""
    if not path.is_file():
        return {"format": LABELS_FORMAT, "backend": "", "model": "", "latents": {}, "errors": {}}
    expected = f"expected the {what} that scripts/interpret.py writes (format {LABELS_FORMAT!r})"
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {expected}") from e
    if not isinstance(table, dict) or table.get("format") != LABELS_FORMAT:
        found = f"format {table.get('format')!r}" if isinstance(table, dict) else f"a JSON {type(table).__name__}"
        raise UserError(f"{path} holds {found}; {expected}")
    if not isinstance(table.get("latents"), dict):
        raise UserError(f"{path} has no 'latents' object; {expected}")
    table.setdefault("errors", {})
    return table


def load_labels(path: str | Path) -> dict[int, Label]:
    """labels.json -> {latent: Label(label, description, confidence, detection_score)}."""
    if not Path(path).is_file():
        raise UserError(f"--labels {path}: no such file (write it with scripts/interpret.py)")
    table = load_table(Path(path))
    try:
        return {int(k): Label(str(v["label"]), str(v["description"]), float(v["confidence"]), v.get("detection_score"))
                for k, v in table["latents"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"--labels {path}: a latent entry lacks label/description/confidence or is malformed "
                        f"({type(e).__name__}: {e})") from e


def _explain(tc: Any, backend: Backend, table: dict, todo: list[int], cfg: InterpretConfig) -> None:
    recs = {lat: tc.latent(lat) for lat in todo}
    reqs = [Request(f"explain-{lat}", EXPLAIN_SYSTEM,
                    explain_prompt(recs[lat], split_counts(len(recs[lat]["max"]), cfg.n_explain,
                                                           cfg.n_detect_pos if cfg.score else 0)[0],
                                   cfg.context_tokens)) for lat in todo]
    for lat, ans in zip(todo, backend.complete(reqs)):
        try:
            if ans.text is None:
                raise ParseError(ans.error or "no answer")
            lab = parse_label(ans.text)
        except ParseError as e:
            table["errors"][str(lat)] = str(e)
            continue
        table["latents"][str(lat)] = {"label": lab.label, "description": lab.description,
                                      "confidence": lab.confidence, "detection_score": None, "detection": None}
        table["errors"].pop(str(lat), None)


def _detect(tc: Any, backend: Backend, table: dict, todo: list[int], cfg: InterpretConfig) -> None:
    samples = {lat: detection_sample(tc, lat, cfg.n_explain, cfg.n_detect_pos, cfg.n_detect_neg,
                                     cfg.context_tokens, cfg.seed) for lat in todo}
    todo = [lat for lat in todo if any(samples[lat].is_pos) and not all(samples[lat].is_pos)]
    reqs = [Request(f"detect-{lat}", DETECT_SYSTEM,
                    detection_prompt(table["latents"][str(lat)]["label"], table["latents"][str(lat)]["description"],
                                     samples[lat])) for lat in todo]
    for lat, ans in zip(todo, backend.complete(reqs)):
        try:
            if ans.text is None:
                raise ParseError(ans.error or "no answer")
            det = score_detection(samples[lat], parse_detection(ans.text, len(samples[lat].texts)))
        except ParseError as e:
            table["errors"][str(lat)] = f"detection: {e}"
            continue
        table["latents"][str(lat)].update(detection_score=det.score, detection=det.as_dict())


def sample_latents(tc: Any, n: int, min_contexts: int, max_freq: float = 0.1, seed: int = 0) -> list[int]:
    """A seeded uniform sample of n latents (ascending) among those firing on at most max_freq of tokens with
    at least min_contexts top contexts (all of them when fewer qualify): an unbiased view of label quality."""
    filled = (np.asarray(tc.array("max_ctx")) >= 0).sum(1)
    ok = np.flatnonzero((filled >= min(min_contexts, tc.n)) & (np.asarray(tc.array("freq")) <= max_freq))
    pick = np.random.default_rng(seed).choice(len(ok), min(n, len(ok)), replace=False)
    return sorted(int(ok[i]) for i in pick)


def run_interpret(cfg: InterpretConfig, tc: Any, backend: Backend, out_dir: Path) -> dict:
    """Label (and score) every latent with contexts that the table does not have yet; returns the table."""
    path = out_dir / "labels.json"
    table = load_table(path)
    table.update(backend=backend.name, model=backend.model)
    has = [lat for lat in range(tc.n_latents) if tc.array("max_ctx")[lat, 0] >= 0]
    if cfg.sample > 0 and cfg.latents:
        raise UserError("--sample and --latents both choose the latents to label: give one of them")
    if not 0.0 < cfg.max_freq <= 1.0:
        raise UserError(f"--max-freq must be in (0, 1], got {cfg.max_freq}")
    if cfg.sample > 0:
        has = sample_latents(tc, cfg.sample, cfg.n_explain + (cfg.n_detect_pos if cfg.score else 0), cfg.max_freq,
                             cfg.seed)
    wanted = [lat for lat in (cfg.latents or has) if 0 <= lat < tc.n_latents and tc.array("max_ctx")[lat, 0] >= 0]
    bad = [lat for lat in cfg.latents if not 0 <= lat < tc.n_latents]
    if bad:
        raise UserError(f"--latents {bad[:5]}: out of range [0, {tc.n_latents})")
    todo = [lat for lat in wanted if str(lat) not in table["latents"]]
    if cfg.max_latents > 0:
        todo = todo[:cfg.max_latents]
    dry = isinstance(backend, DryRunBackend)
    explain, detect = _explain, _detect
    if cfg.prompt == "simple":
        if not isinstance(backend, LlamaBackend):
            raise UserError(f"--prompt simple needs --backend llama (it reads the model's logits), not {backend.name}")
        from sae.analysis.interpret_small import check_yes_no, detect_into, explain_into
        check_yes_no(backend.tok)
        explain, detect = explain_into, detect_into
    unscored = [] if (dry or not cfg.score) else [lat for lat in wanted if str(lat) in table["latents"]
                                                  and table["latents"][str(lat)].get("detection_score") is None]
    bar = progress_bar(total=len(todo) + len(unscored), unit="latent", desc=f"interpret ({backend.name})",
               disable=not cfg.progress)
    for i in range(0, len(todo), cfg.save_every):
        chunk = todo[i:i + cfg.save_every]
        explain(tc, backend, table, chunk, cfg)
        if dry:
            table["errors"] = {}
        elif cfg.score:
            detect(tc, backend, table, [lat for lat in chunk if str(lat) in table["latents"]], cfg)
        if not dry:
            atomic_write_json(path, table)
        bar.update(len(chunk))
    for i in range(0, len(unscored), cfg.save_every):
        detect(tc, backend, table, unscored[i:i + cfg.save_every], cfg)
        atomic_write_json(path, table)
        bar.update(len(unscored[i:i + cfg.save_every]))
    bar.close()
    if cfg.prompt == "simple" and cfg.score and not dry:  # once every label exists: each is judged against another
        from sae.analysis.interpret_small import control_into
        control_into(tc, backend, table, cfg)
        atomic_write_json(path, table)
    return table
