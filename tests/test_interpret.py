"""Automated interpretation against a real HTTP server on 127.0.0.1 (OpenAI- and Anthropic-shaped fakes, Message
Batches included): success, malformed answers, 429/500 with retry, timeouts, resumability; the answer parser; the
detection score; and the offline Llama backend on a small model.

The analysis folder is synthetic with a known answer: latent l fires exactly on token "w<l>", so an oracle labeller
(the fake server) that labels from the highlighted tokens and detects by looking for that token must score 1.0."""
from __future__ import annotations

import collections
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llama.cli import UserError
from sae.analysis.backends import AnthropicBackend, AnthropicBatchBackend, LlamaBackend, OpenAIBackend, Request
from sae.analysis.http import HTTPClient
from sae.analysis.interpret import InterpretConfig, load_labels, run_interpret
from sae.analysis.parsing import ParseError, extract_json, parse_label
from sae.analysis.scoring import balanced_accuracy
from sae.analysis.sources import StoreSource
from sae.analysis.top_contexts import TopContextsConfig, compute_top_contexts, load_top_contexts

torch.set_num_threads(1)
V, BOS = 24, 1
KEY = "sk-test-SECRET-123"


class OneHotSAE:
    """Latent l fires (value 1) exactly on token id l: x is the token's one-hot vector."""
    W_dec = torch.eye(V)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = x.topk(1, dim=1)
        return torch.relu(v), i


class Store:
    def __init__(self, n_docs: int = 80, seed: int = 0):
        rng = np.random.default_rng(seed)
        lens = rng.integers(3, 9, n_docs)
        self.doc_id = np.repeat(np.arange(n_docs), lens)
        self.token_id = rng.integers(2, V, len(self.doc_id))
        self.token_id[np.r_[0, np.cumsum(lens)[:-1]]] = BOS
        self.x = torch.nn.functional.one_hot(torch.from_numpy(self.token_id), V).float()

    def __len__(self) -> int:
        return len(self.doc_id)

    def rows(self, i0: int, i1: int) -> torch.Tensor:
        return self.x[i0:i1]

    def meta(self, i0: int, i1: int) -> dict:
        return {"token_id": self.token_id[i0:i1], "doc_id": self.doc_id[i0:i1]}


class Tok:
    bos_id, n_words = BOS, V

    def decode(self, ids: list[int]) -> str:
        return "".join(f" w{i}" for i in ids)


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis")
    compute_top_contexts(StoreSource(Store(), 64), OneHotSAE(), out,
                         TopContextsConfig(n=12, n_random=40, progress=False), tokenizer=Tok())
    return out


# ---- the fake server -----------------------------------------------------------------------------------------

def oracle(system: str, user: str) -> str:
    """A perfect labeller for the one-hot SAE: label = the highlighted token; detect = excerpts containing it."""
    if "Excerpts:" in user:
        tok = re.search(r"Feature explanation: the token (w\d+)", user).group(1)
        lines = re.findall(r"^(\d+)\. '(.*)'$", user, re.M)
        active = [int(n) for n, text in lines if re.search(rf"\b{tok}\b", text)]
        return json.dumps({"active": active})
    toks = collections.Counter(re.findall(r"<<(w\d+)>>", user))
    return "Sure! Here it is:\n```json\n" + json.dumps(
        {"label": f"the token {toks.most_common(1)[0][0]}", "description": "fires on one token.", "confidence": 0.9}
    ) + "\n```\nHope this helps."


class Fake:
    def __init__(self) -> None:
        self.script: collections.deque = collections.deque()  # forced behaviours, consumed one per request
        self.log: list[dict] = []
        self.batches: dict[str, dict] = {}
        self.polls_before_end = 2
        self.batch_errors: set[str] = set()
        self.oracle = oracle


def make_handler(fake: Fake) -> type:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def _send(self, code: int, obj: Any, headers: dict | None = None, raw: bool = False) -> None:
            data = (obj if raw else json.dumps(obj)).encode()
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left (the timeout test)

        def _handle(self, method: str) -> None:
            n = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            fake.log.append({"method": method, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            forced = fake.script.popleft() if fake.script else None
            if forced and forced[0] == "status":
                return self._send(forced[1], {"error": {"type": "overloaded"}}, {"retry-after": "0"})
            if forced and forced[0] == "sleep":
                time.sleep(forced[1])
            p = self.path
            if p == "/v1/chat/completions":
                sys_, user = body["messages"][0]["content"], body["messages"][1]["content"]
                text = forced[1] if forced and forced[0] == "text" else fake.oracle(sys_, user)
                return self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})
            if p == "/v1/messages":
                text = forced[1] if forced and forced[0] == "text" else oracle(body["system"],
                                                                              body["messages"][0]["content"])
                return self._send(200, {"type": "message", "content": [{"type": "text", "text": text}]})
            if p == "/v1/messages/batches" and method == "POST":
                bid = f"msgbatch_{len(fake.batches)}"
                fake.batches[bid] = {"requests": body["requests"], "polls": 0}
                return self._send(200, {"id": bid, "processing_status": "in_progress"})
            m = re.fullmatch(r"/v1/messages/batches/(\w+)(/results)?", p)
            if m and method == "GET":
                b = fake.batches[m.group(1)]
                if m.group(2):
                    lines = []
                    for r in b["requests"]:
                        if r["custom_id"] in fake.batch_errors:
                            res = {"type": "errored", "error": {"type": "invalid_request"}}
                        else:
                            prm = r["params"]
                            res = {"type": "succeeded", "message": {"content": [
                                {"type": "text", "text": oracle(prm["system"], prm["messages"][0]["content"])}]}}
                        lines.append(json.dumps({"custom_id": r["custom_id"], "result": res}))
                    return self._send(200, "\n".join(lines) + "\n", raw=True)
                b["polls"] += 1
                ended = b["polls"] >= fake.polls_before_end
                url = f"http://127.0.0.1:{self.server.server_address[1]}{p}/results"
                return self._send(200, {"id": m.group(1), "processing_status": "ended" if ended else "in_progress",
                                        "results_url": url if ended else None})
            self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            self._handle("POST")

        def do_GET(self) -> None:
            self._handle("GET")

    return Handler


@pytest.fixture()
def server():
    fake = Fake()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield fake
    httpd.shutdown()
    httpd.server_close()


def client(**kw: Any) -> HTTPClient:
    return HTTPClient(**{"timeout": 5.0, "retries": 3, "backoff": 0.01, **kw})


def cfg(analysis: Path, **kw: Any) -> InterpretConfig:
    return InterpretConfig(analysis=str(analysis), progress=False, n_explain=6, n_detect_pos=4, n_detect_neg=6, **kw)


def firing_latents(analysis: Path) -> list[int]:
    return [int(i) for i in np.flatnonzero(load_top_contexts(analysis).array("fire_count") > 0)]


# ---- tests ---------------------------------------------------------------------------------------------------

def test_openai_end_to_end_with_oracle(analysis, server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    backend = OpenAIBackend("fake-model", server.url + "/v1", client=client())
    table = run_interpret(cfg(analysis), load_top_contexts(analysis), backend, tmp_path)
    fired = firing_latents(analysis)
    assert sorted(map(int, table["latents"])) == fired and len(fired) == V - 2  # tokens 2..V-1, BOS skipped
    labels = load_labels(tmp_path / "labels.json")
    for lat in fired:
        assert labels[lat].label == f"the token w{lat}" and labels[lat].confidence == 0.9
        assert labels[lat].detection_score == 1.0  # the oracle detects perfectly
        assert table["latents"][str(lat)]["detection"]["n_pos"] >= 1 and table["latents"][str(lat)]["detection"]["n_neg"] >= 1
    assert all(r["headers"].get("authorization") == f"Bearer {KEY}" for r in server.log)
    assert KEY not in (tmp_path / "labels.json").read_text() and KEY not in capsys.readouterr().out


def test_wrong_labels_score_at_chance_or_below(analysis, server, tmp_path):
    """A labeller that says every excerpt is active: TPR 1, TNR 0 -> balanced accuracy exactly 0.5."""
    def says_all(system: str, user: str) -> str:
        if "Excerpts:" in user:
            return json.dumps({"active": [int(n) for n in re.findall(r"^(\d+)\. ", user, re.M)]})
        return '{"label": "x", "description": "", "confidence": 1}'

    server.oracle = says_all
    table = run_interpret(cfg(analysis), load_top_contexts(analysis), OpenAIBackend("m", server.url + "/v1",
                                                                                    client=client()), tmp_path)
    assert {v["detection_score"] for v in table["latents"].values()} == {0.5}


def test_malformed_answers_are_errors_and_a_rerun_retries_only_them(analysis, server, tmp_path):
    tc = load_top_contexts(analysis)
    backend = OpenAIBackend("m", server.url + "/v1", client=client())
    server.script.extend([("text", "I think it is about numbers."), ("text", '{"label": "", "confidence": 0.5}'),
                          ("text", '{"label": "ok", "description": "d", "confidence": "very"}')])
    c = cfg(analysis, score=False)
    table = run_interpret(c, tc, backend, tmp_path)
    fired = firing_latents(analysis)
    assert sorted(map(int, table["errors"])) == fired[:3]
    assert "no JSON object" in table["errors"][str(fired[0])] and "label" in table["errors"][str(fired[1])]
    assert len(table["latents"]) == len(fired) - 3
    n_before = len(server.log)
    table = run_interpret(c, tc, backend, tmp_path)  # resume: only the 3 failed latents are asked again
    assert len(server.log) - n_before == 3 and not table["errors"] and len(table["latents"]) == len(fired)
    assert json.loads((tmp_path / "labels.json").read_text()) == table
    n_before = len(server.log)
    run_interpret(c, tc, backend, tmp_path)
    assert len(server.log) == n_before  # everything labelled: nothing to do


def test_retries_on_429_and_500_then_success(analysis, server, tmp_path):
    server.script.extend([("status", 429), ("status", 500), ("status", 503)])
    backend = OpenAIBackend("m", server.url + "/v1", client=client())
    answers = backend.complete([Request("explain-3", "s", "x <<w3>> y")])
    assert answers[0].error is None and extract_json(answers[0].text)["label"] == "the token w3"
    assert len(server.log) == 4
    server.script.extend([("status", 500)] * 3)
    bad = OpenAIBackend("m", server.url + "/v1", client=client(retries=2)).complete([Request("explain-3", "s", "u")])
    assert bad[0].text is None and "giving up after 3 attempts" in bad[0].error and "HTTP 500" in bad[0].error
    server.script.append(("status", 400))  # not retryable: fails at once
    n = len(server.log)
    bad = backend.complete([Request("explain-3", "s", "u")])
    assert "HTTP 400" in bad[0].error and len(server.log) == n + 1


def test_timeouts_retry_then_give_up(analysis, server):
    server.script.append(("sleep", 1.0))
    ok = OpenAIBackend("m", server.url + "/v1", client=client(timeout=0.3, retries=1)).complete(
        [Request("explain-5", "s", "a <<w5>>")])
    assert ok[0].error is None and "w5" in ok[0].text
    server.script.extend([("sleep", 1.0)] * 2)
    bad = OpenAIBackend("m", server.url + "/v1", client=client(timeout=0.3, retries=1)).complete(
        [Request("explain-5", "s", "a <<w5>>")])
    assert bad[0].text is None and "timed out" in bad[0].error


def test_anthropic_messages(analysis, server, tmp_path, monkeypatch):
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(UserError, match="MY_KEY"):
        AnthropicBackend("claude", server.url, api_key_env="MY_KEY")
    monkeypatch.setenv("MY_KEY", KEY)
    server.script.append(("status", 529))  # Anthropic's "overloaded"
    backend = AnthropicBackend("claude", server.url, api_key_env="MY_KEY", client=client())
    table = run_interpret(cfg(analysis, latents=[4, 7]), load_top_contexts(analysis), backend, tmp_path)
    assert {k: v["label"] for k, v in table["latents"].items()} == {"4": "the token w4", "7": "the token w7"}
    assert all(v["detection_score"] == 1.0 for v in table["latents"].values())
    posts = [r for r in server.log if r["method"] == "POST"]
    assert all(r["headers"]["x-api-key"] == KEY and r["headers"]["anthropic-version"] == "2023-06-01" for r in posts)
    assert posts[-1]["body"]["model"] == "claude" and posts[-1]["body"]["messages"][0]["role"] == "user"


def test_anthropic_message_batches(analysis, server, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    server.batch_errors = {"explain-9"}
    backend = AnthropicBatchBackend("claude", server.url, client=client(), poll_interval=0.0)
    table = run_interpret(cfg(analysis, save_every=100), load_top_contexts(analysis), backend, tmp_path)
    fired = firing_latents(analysis)
    assert sorted(map(int, table["latents"])) == [lat for lat in fired if lat != 9]
    assert "errored" in table["errors"]["9"]
    assert all(v["detection_score"] == 1.0 for v in table["latents"].values())
    creates = [r for r in server.log if r["method"] == "POST"]
    assert len(creates) == 2  # one batch of explanations, one of detections
    assert len(creates[0]["body"]["requests"]) == len(fired)
    assert sum(r["path"].endswith("/results") for r in server.log) == 2
    assert sum(1 for r in server.log if r["method"] == "GET" and not r["path"].endswith("/results")) == 4  # 2 polls each


def test_dry_run_writes_prompts_only(analysis, tmp_path):
    from sae.analysis.interpret import make_backend
    c = cfg(analysis, dry_run=True)
    table = run_interpret(c, load_top_contexts(analysis), make_backend(c, tmp_path), tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    fired = firing_latents(analysis)
    assert [x["latent"] for x in lines] == fired and {x["kind"] for x in lines} == {"explain"}
    for x in lines:  # the activating token (and only it) is highlighted
        marks = set(re.findall(r"<<(.*?)>>", x["messages"][1]["content"])) - {"like this"}  # the instructions
        assert marks == {f"w{x['latent']}"}
    assert not (tmp_path / "labels.json").exists() and not table["latents"]


def test_parse_label_robustness():
    good = {"label": "Numbers  in dates", "description": "years", "confidence": 0.7}
    for text in [json.dumps(good), "```json\n" + json.dumps(good) + "\n```", "Here:\n" + json.dumps(good) + "\nDone.",
                 '{"label": "Numbers in dates", "description": "years", "confidence": 0.7,}',
                 "```\n" + json.dumps({**good, "confidence": "70%"}) + "```", json.dumps({**good, "confidence": 70})]:
        assert parse_label(text) == ("Numbers in dates", "years", pytest.approx(0.7), None)
    for text, msg in [("", "empty"), ("no json here", "no JSON"), ('{"label": 3, "confidence": 1}', "label"),
                      ('{"label": "a", "description": "b"}', "confidence"),
                      ('{"label": "a", "confidence": 250}', "confidence"),
                      ('{"label": "a", "confidence": true}', "confidence"), ('[1, 2]', "no JSON")]:
        with pytest.raises(ParseError, match=msg):
            parse_label(text)


def test_balanced_accuracy_reference():
    # brute force over small confusion matrices against sklearn's definition (mean of per-class recall)
    for tp, fp, tn, fn in [(3, 1, 4, 2), (0, 0, 5, 5), (5, 5, 0, 0), (2, 0, 8, 0)]:
        y = [1] * (tp + fn) + [0] * (tn + fp)
        pred = [1] * tp + [0] * fn + [0] * tn + [1] * fp
        recalls = [np.mean([p == c for p, t in zip(pred, y) if t == c]) for c in (0, 1)]
        assert balanced_accuracy(tp, fp, tn, fn) == pytest.approx(np.mean(recalls))


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    """weights/tiny when it exists (the embedded instruct model), else a random-weight model with a tiny
    SentencePiece tokenizer trained with the chat control symbols."""
    import llama
    tiny = Path(__file__).resolve().parents[1] / "weights" / "tiny"
    if (tiny / "params.json").exists() or (tiny / "config.json").exists():
        return llama.load_model(tiny), llama.Tokenizer.from_file(tiny), "tiny"
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    corpus = [f"the feature w{i} fires on token w{i} in the text" for i in range(V)] * 4
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=64, minloglevel=2,
                                   control_symbols=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                                   hard_vocab_limit=False)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    tok = llama.Tokenizer.from_file(path)
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                              multiple_of=16, max_seq_len=2048)).eval()
    return model, tok, "random"


def test_llama_backend_offline(analysis, tmp_path, chat_llama):
    model, tok, kind = chat_llama
    backend = LlamaBackend("", model=model, tokenizer=tok, max_tokens=6, batch_size=3)
    reqs = [Request(f"explain-{i}", "You label features.", f"tokens <<w{i}>> here") for i in (2, 3, 4, 5)]
    answers = backend.complete(reqs)
    assert kind != "random" or backend.chat is not None  # our random model's tokenizer has the chat tokens
    check_greedy(backend, model, tok, reqs, answers)

    class NoChat:  # the same tokenizer without chat tokens: a base model gets a plain-text prompt
        special_tokens: dict = {}

        def __getattr__(self, name: str) -> Any:
            return getattr(tok, name)

    plain = LlamaBackend("", model=model, tokenizer=NoChat(), max_tokens=6, batch_size=3)
    assert plain.chat is None
    check_greedy(plain, model, tok, reqs, plain.complete(reqs))
    table = run_interpret(cfg(analysis, latents=[2, 3], max_tokens=6, score=False), load_top_contexts(analysis),
                          backend, tmp_path)
    assert set(table["errors"]) | set(table["latents"]) == {"2", "3"}  # answered or recorded, nothing crashes
    if kind == "random":  # gibberish is not JSON
        assert set(table["errors"]) == {"2", "3"}


def check_greedy(backend: LlamaBackend, model: Any, tok: Any, reqs: list[Request], answers: list) -> None:
    from llama.chat import ChatFormat
    for r, a in zip(reqs, answers):  # greedy answers equal a cache-free reference decode
        seq = (ChatFormat(tok).encode_dialog_prompt([{"role": "system", "content": r.system},
                                                     {"role": "user", "content": r.user}]) if backend.chat else
               tok.encode(f"{r.system}\n\n{r.user}\n\nAnswer:", bos=True, eos=False))
        n0 = len(seq)
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                if nxt in tok.stop_tokens:
                    break
                seq.append(nxt)
        assert a.error is None and a.text == tok.decode(seq[n0:])


def test_a_labels_file_that_is_not_a_labels_table_is_named_with_what_is_wrong(tmp_path):
    from llama.cli import UserError
    bad = tmp_path / "labels.json"
    for text, wrong in (("{not json", "is not valid JSON (Expecting property name"), ("[1, 2]", "holds a JSON list"),
                        ('{"format": "other/1"}', "holds format 'other/1'"),
                        ('{"format": "llama-sae-labels/1"}', "has no 'latents' object")):
        bad.write_text(text)
        with pytest.raises(UserError) as e:
            load_labels(bad)
        msg = str(e.value)
        assert msg.startswith(f"{bad} {wrong}") and "scripts/interpret.py" in msg and "move it away" not in msg
    bad.write_text('{"format": "llama-sae-labels/1", "latents": {"3": {"label": "x"}}}')
    with pytest.raises(UserError, match="--labels .*labels.json: a latent entry lacks"):
        load_labels(bad)
    with pytest.raises(UserError, match="no such file"):
        load_labels(tmp_path / "missing.json")
