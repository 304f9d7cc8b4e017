"""A small local web UI for steering: type a prompt, pick latents and strengths, watch the steered and the unsteered
completion stream side by side. Standard library only (http.server), bound to 127.0.0.1.

    GET  /                  the page (sae/steering/ui.html)
    GET  /api/info          {"n_latents", "hook_name", "limits"}
    GET  /api/latents?q=... latents whose label matches q (or the latent with that number): [{"latent", "label"}]
    POST /api/generate      JSON request (validated, see `parse_request`) -> chunked NDJSON stream, one line per
                            token: {"side": "steered"|"clean", "text", "token", "latents": [[id, act, label]],
                            "stop"}, then {"done": true}; errors are {"error": "..."} (HTTP 400 before streaming)

Steered and unsteered rows are one batch of two (the splice steers row 0 only), so both stream together. The client
never names a file: the model, SAE and labels are fixed when the server starts.
"""
from __future__ import annotations

import ipaddress
import json
import math
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlparse

from llama.cli import UserError
from sae.steering.steer import Steer, Steering, encode_prompts, find_latents, label_of, steered_stream

PAGE = Path(__file__).with_name("ui.html")
LIMITS = {"prompt_chars": 4000, "steers": 8, "max_new_tokens": 256, "strength": 1000.0, "temperature": 2.0,
          "seed": 2**31 - 1, "body_bytes": 65536, "record": 5}


class Request(NamedTuple):
    prompt: str
    chat: bool
    steers: list[Steer]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    error_term: bool


def _num(d: dict, key: str, default: Any, lo: float, hi: float, integer: bool = False) -> Any:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()) \
            or not math.isfinite(v) or not lo <= v <= hi:
        raise UserError(f"{key} must be {'an integer' if integer else 'a number'} in [{lo:g}, {hi:g}], got {v!r}")
    return int(v) if integer else float(v)


def parse_request(body: Any, n_latents: int, max_new_tokens: int = LIMITS["max_new_tokens"]) -> Request:
    """Validate a /api/generate JSON body; any problem is one UserError naming the field."""
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > LIMITS["prompt_chars"]:
        raise UserError(f"prompt must be a non-empty string of at most {LIMITS['prompt_chars']} characters")
    steers_in = body.get("steers", [])
    if not isinstance(steers_in, list) or len(steers_in) > LIMITS["steers"]:
        raise UserError(f"steers must be a list of at most {LIMITS['steers']} objects")
    steers = []
    for s in steers_in:
        if not isinstance(s, dict) or s.get("mode", "add") not in ("add", "clamp"):
            raise UserError('each steer must be {"latent": int, "strength": number, "mode": "add"|"clamp"}')
        steers.append(Steer(_num(s, "latent", None, 0, n_latents - 1, integer=True),
                            _num(s, "strength", None, -LIMITS["strength"], LIMITS["strength"]), s.get("mode", "add")))
    for flag in ("chat", "error_term"):
        if not isinstance(body.get(flag, flag == "error_term"), bool):
            raise UserError(f"{flag} must be true or false")
    return Request(prompt, body.get("chat", False), steers,
                   _num(body, "max_new_tokens", min(48, max_new_tokens), 1, max_new_tokens, integer=True),
                   _num(body, "temperature", 0.0, 0.0, LIMITS["temperature"]), _num(body, "top_p", 1.0, 1e-6, 1.0),
                   _num(body, "seed", 0, 0, LIMITS["seed"], integer=True), body.get("error_term", True))


class SteerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, st: Steering, port: int = 0, host: str = "127.0.0.1", max_new_tokens: int = 256) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise UserError(f"--host {host}: the steering UI only listens on a loopback address (127.0.0.1)")
        self.st, self.max_new_tokens, self.lock = st, max_new_tokens, threading.Lock()
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}/"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: SteerServer

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per request is noise in a terminal UI
        pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:
        url = urlparse(self.path)
        st = self.server.st
        if url.path in ("/", "/index.html"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif url.path == "/api/info":
            self._json({"n_latents": int(st.sae.W_dec.shape[0]), "hook_name": st.sae.cfg.hook_name,
                        "labelled": len(st.labels), "limits": {**LIMITS, "max_new_tokens": self.server.max_new_tokens}})
        elif url.path == "/api/latents":
            q = parse_qs(url.query).get("q", [""])[0][:200]
            n = int(st.sae.W_dec.shape[0])
            if q.strip().isdigit():
                ids = [int(q)] if int(q) < n else []
            else:  # label search; an empty query lists the first labelled latents
                ids = find_latents(q, st.labels)[:50] if q.strip() else sorted(st.labels)[:50]
            self._json([{"latent": i, "label": label_of(st.labels, i)} for i in ids])
        else:
            self._json({"error": f"not found: {url.path}"}, 404)

    def do_POST(self) -> None:
        if urlparse(self.path).path != "/api/generate":
            return self._json({"error": "not found"}, 404)
        try:
            length = int(self.headers.get("Content-Length", "-1"))
            if not 0 < length <= LIMITS["body_bytes"]:
                raise UserError(f"request body must be 1..{LIMITS['body_bytes']} bytes of JSON (Content-Length)")
            try:
                body = json.loads(self.rfile.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError("request body is not valid JSON") from None
            req = parse_request(body, int(self.server.st.sae.W_dec.shape[0]), self.server.max_new_tokens)
            st = self.server.st
            prompts = encode_prompts(st.tokenizer, [req.prompt], chat=req.chat) * 2
            if len(prompts[0]) + req.max_new_tokens > st.model.args.max_seq_len:
                raise UserError(f"prompt ({len(prompts[0])} tokens) + max_new_tokens exceeds the model's "
                                f"max_seq_len {st.model.args.max_seq_len}")
        except UserError as e:
            return self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)
        if not self.server.lock.acquire(timeout=120):
            return self._json({"error": "busy: another generation is running"}, HTTPStatus.SERVICE_UNAVAILABLE)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            try:
                for ev in steered_stream(st.model, st.tokenizer, st.sae, prompts, req.steers, req.max_new_tokens,
                                         temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                         error_term=req.error_term, rows=[True, False], record=LIMITS["record"]):
                    self._chunk({"side": "steered" if ev.index == 0 else "clean", "text": ev.text, "token": ev.token,
                                 "latents": [[i, round(a, 4), label_of(st.labels, i)] for i, a in ev.latents],
                                 "stop": ev.stop_reason})
                self._chunk({"done": True})
            except UserError as e:
                self._chunk({"error": str(e)})
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):  # the browser went away: stop generating
            self.close_connection = True
        finally:
            self.server.lock.release()

    def _chunk(self, obj: Any) -> None:
        data = (json.dumps(obj) + "\n").encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()
