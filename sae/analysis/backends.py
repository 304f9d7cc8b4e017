"""Chat backends for automated interpretation, all behind one call: `backend.complete(requests) -> answers`.

    openai          any OpenAI-compatible /chat/completions endpoint (OpenAI, vLLM, llama.cpp server, Ollama...)
    anthropic       Anthropic's Messages API, one request at a time
    anthropic-batch Anthropic's Message Batches API (half the price; results arrive when the batch ends)
    llama           our own Llama (an instruct checkpoint folder) through llama/generate.py: fully offline
    dry-run         writes the prompts to a JSONL file and answers nothing

Only the standard library's HTTP client is used (sae/analysis/http.py). API keys come from environment variables
and are never printed, logged or written to the saved config.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

from llama.cli import UserError
from sae.analysis.http import HTTPClient, HTTPFailure

BACKENDS = ("openai", "anthropic", "anthropic-batch", "llama", "dry-run")
ANTHROPIC_VERSION = "2023-06-01"


class Request(NamedTuple):
    custom_id: str  # [a-zA-Z0-9_-]{1,64} (the batch API's rule)
    system: str
    user: str


class Answer(NamedTuple):
    custom_id: str
    text: str | None  # None when the request failed
    error: str | None = None


class Backend(Protocol):
    name: str
    model: str

    def complete(self, requests: list[Request]) -> list[Answer]: ...


def _one_by_one(requests: list[Request], call: Callable[[Request], str]) -> list[Answer]:
    out = []
    for r in requests:
        try:
            out.append(Answer(r.custom_id, call(r)))
        except HTTPFailure as e:
            out.append(Answer(r.custom_id, None, str(e)))
    return out


def _api_key(env: str, required: bool) -> str | None:
    key = os.environ.get(env, "").strip()
    if not key and required:
        raise UserError(f"environment variable {env} is not set (it must hold the API key; --api-key-env names it)")
    return key or None


class OpenAIBackend:
    name = "openai"

    def __init__(self, model: str, base_url: str = "https://api.openai.com/v1", api_key_env: str = "OPENAI_API_KEY",
                 client: HTTPClient | None = None, max_tokens: int = 400, temperature: float = 0.0):
        if not model:
            raise UserError("--model is required for the openai backend (the served model's name)")
        self.model, self.url = model, base_url.rstrip("/") + "/chat/completions"
        self.key = _api_key(api_key_env, required=False)  # local servers need none
        self.client, self.max_tokens, self.temperature = client or HTTPClient(), max_tokens, temperature

    def _call(self, r: Request) -> str:
        headers = {"authorization": f"Bearer {self.key}"} if self.key else {}
        body = {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": r.system}, {"role": "user", "content": r.user}]}
        ans = self.client.request("POST", self.url, headers, body)
        try:
            return str(ans["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError) as e:
            raise HTTPFailure(f"unexpected chat-completions answer shape ({e!r}): {str(ans)[:200]}") from None

    def complete(self, requests: list[Request]) -> list[Answer]:
        return _one_by_one(requests, self._call)


def _anthropic_text(message: Any) -> str:
    try:
        return "".join(b.get("text", "") for b in message["content"] if b.get("type") == "text")
    except (KeyError, TypeError, AttributeError) as e:
        raise HTTPFailure(f"unexpected Messages answer shape ({e!r}): {str(message)[:200]}") from None


class AnthropicBackend:
    name = "anthropic"

    def __init__(self, model: str, base_url: str = "https://api.anthropic.com", api_key_env: str = "ANTHROPIC_API_KEY",
                 client: HTTPClient | None = None, max_tokens: int = 400, temperature: float = 0.0,
                 poll_interval: float = 30.0, batch_size: int = 10_000, sleep: Callable[[float], None] = time.sleep):
        if not model:
            raise UserError("--model is required for the anthropic backends (e.g. claude-3-5-haiku-latest)")
        self.model, self.base = model, base_url.rstrip("/")
        self.key = _api_key(api_key_env, required=True)
        self.client, self.max_tokens, self.temperature = client or HTTPClient(), max_tokens, temperature
        self.poll_interval, self.batch_size, self.sleep = poll_interval, batch_size, sleep

    def _headers(self) -> dict[str, str]:
        return {"x-api-key": self.key or "", "anthropic-version": ANTHROPIC_VERSION}

    def _params(self, r: Request) -> dict:
        return {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "system": r.system, "messages": [{"role": "user", "content": r.user}]}

    def _call(self, r: Request) -> str:
        return _anthropic_text(self.client.request("POST", f"{self.base}/v1/messages", self._headers(), self._params(r)))

    def complete(self, requests: list[Request]) -> list[Answer]:
        return _one_by_one(requests, self._call)


class AnthropicBatchBackend(AnthropicBackend):
    """Message Batches: create, poll until `processing_status == "ended"`, read the JSONL results."""
    name = "anthropic-batch"

    def complete(self, requests: list[Request]) -> list[Answer]:
        out: list[Answer] = []
        for i in range(0, len(requests), self.batch_size):
            out += self._batch(requests[i:i + self.batch_size])
        return out

    def _batch(self, requests: list[Request]) -> list[Answer]:
        if not requests:
            return []
        body = {"requests": [{"custom_id": r.custom_id, "params": self._params(r)} for r in requests]}
        try:
            batch = self.client.request("POST", f"{self.base}/v1/messages/batches", self._headers(), body)
            while batch.get("processing_status") != "ended":
                self.sleep(self.poll_interval)
                batch = self.client.request("GET", f"{self.base}/v1/messages/batches/{batch['id']}", self._headers())
            url = batch.get("results_url") or f"{self.base}/v1/messages/batches/{batch['id']}/results"
            text = self.client.request("GET", url, self._headers(), raw=True)
        except (HTTPFailure, KeyError, TypeError) as e:
            return [Answer(r.custom_id, None, f"message batch failed: {e}") for r in requests]
        results: dict[str, Answer] = {}
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                cid, res = item["custom_id"], item["result"]
                if res.get("type") == "succeeded":
                    results[cid] = Answer(cid, _anthropic_text(res["message"]))
                else:
                    results[cid] = Answer(cid, None, f"batch result {res.get('type')}: {str(res.get('error'))[:200]}")
            except (json.JSONDecodeError, KeyError, TypeError, HTTPFailure):
                continue  # a broken line: its request is reported missing below
        return [results.get(r.custom_id, Answer(r.custom_id, None, "missing from the batch results"))
                for r in requests]


class LlamaBackend:
    """Our own Llama answering greedily (by default): in the model's chat format (Llama 3's or ChatML) when the
    tokenizer has chat tokens (an instruct checkpoint), else as a plain-text continuation of "system / user /
    Answer:" (a base model)."""
    name = "llama"

    def __init__(self, model_dir: str, device: str = "cpu", max_tokens: int = 400, temperature: float = 0.0,
                 batch_size: int = 8, seed: int = 0, model: Any = None, tokenizer: Any = None):
        import llama
        from llama.chat import chat_format
        if model is None:
            model_dir = str(llama.resolve_model(model_dir)) if model_dir else ""  # a path, or a name: smollm2
            if not model_dir or not Path(model_dir).exists():
                raise UserError(f"--model {model_dir!r}: not a model folder or file (the llama backend needs a "
                                "checkpoint, ideally an instruct model: Meta or HF layout, a .gguf file, or smollm2)")
            import torch
            model = llama.load_model(model_dir, device=device, dtype=torch.float32)
            tokenizer = llama.Tokenizer.from_file(model_dir)
        self.llm, self.tok, self.model = model, tokenizer, str(model_dir)
        self.max_tokens, self.temperature, self.batch_size, self.seed = max_tokens, temperature, batch_size, seed
        self.chat: Any = chat_format(tokenizer)

    def prompt_ids(self, r: Request) -> list[int]:
        if self.chat is not None:
            return self.chat.encode_dialog_prompt([{"role": "system", "content": r.system},
                                                   {"role": "user", "content": r.user}])
        return self.tok.encode(f"{r.system}\n\n{r.user}\n\nAnswer:", bos=True, eos=False)

    def complete(self, requests: list[Request]) -> list[Answer]:
        from llama.generate import generate
        limit = self.llm.args.max_seq_len
        out = []
        for i in range(0, len(requests), self.batch_size):
            chunk = [(r, self.prompt_ids(r)) for r in requests[i:i + self.batch_size]]
            fits = [(r, p) for r, p in chunk if len(p) + self.max_tokens <= limit]
            out += [Answer(r.custom_id, None, f"llama backend: prompt of {len(p)} tokens + {self.max_tokens} new "
                           f"tokens exceeds the model's max_seq_len {limit}") for r, p in chunk if (r, p) not in fits]
            if not fits:
                continue
            try:
                done = generate(self.llm, self.tok, [p for _, p in fits], self.max_tokens,
                                temperature=self.temperature, seed=self.seed)
                out += [Answer(r.custom_id, self.tok.decode(t)) for (r, _), t in zip(fits, done.tokens)]
            except UserError as e:
                out += [Answer(r.custom_id, None, f"llama backend: {e}") for r, _ in fits]
        order = {r.custom_id: j for j, r in enumerate(requests)}
        return sorted(out, key=lambda a: order[a.custom_id])


class DryRunBackend:
    """Appends every request to `path` as JSONL ({"latent", "kind", "custom_id", "messages"}), answers nothing.
    (custom ids are "<kind>-<latent>", see sae/analysis/interpret.py)"""
    name, model = "dry-run", ""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.unlink(missing_ok=True)  # each dry run writes the full set of prompts afresh

    def complete(self, requests: list[Request]) -> list[Answer]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            for r in requests:
                kind, _, lat = r.custom_id.rpartition("-")
                fh.write(json.dumps({"latent": int(lat) if lat.isdigit() else None, "kind": kind,
                                     "custom_id": r.custom_id, "messages": [
                    {"role": "system", "content": r.system}, {"role": "user", "content": r.user}]}) + "\n")
        return [Answer(r.custom_id, None, "dry run") for r in requests]
