"""Real-browser tests: headless Chromium (Debian's `chromium`) drives the static dashboard and the steering UI.

No test-only Python dependency: Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
NUL-separated JSON on file descriptors 3 and 4), so nothing listens on a port and nothing is downloaded. When
Chromium is missing, the setup installs it with apt-get (root only); if that fails every test here is SKIPPED with
the reason (pytest -ra prints it), never passed.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900"]


def find_chromium() -> tuple[str | None, str]:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name), ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "chromium is not installed and apt-get is not usable here (not root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True,
                           text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"chromium missing and `apt-get install chromium` failed: {e}"
    path = shutil.which("chromium")
    return path, "" if path else f"chromium missing and `apt-get install chromium` failed: {r.stderr[-300:]}"


class Browser:
    """A minimal DevTools-protocol client over Chromium's debugging pipe: one page, console errors collected."""

    def __init__(self, exe: str) -> None:
        self.user_dir = tempfile.mkdtemp(prefix="chromium-test-")
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def fds() -> None:  # the child reads commands on fd 3 and writes replies on fd 4
            a, b = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.user_dir}",
                                      "--remote-debugging-pipe", "about:blank"], close_fds=False, preexec_fn=fds,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf, self._id, self.errors, self.events = b"", 0, [], []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(domain, session=True)

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.time() > deadline:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise EOFError("chromium closed the debugging pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def _event(self, m: dict) -> None:
        self.events.append(m.get("method"))
        p = m.get("params", {})
        if m.get("method") == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(p["exceptionDetails"])[:400])
        elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append(str([a.get("value") for a in p.get("args", [])]))
        elif m.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
            self.errors.append(p["entry"].get("text", "") + " " + p["entry"].get("url", ""))

    def call(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 30) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            m = self._recv(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self._event(m)

    def goto(self, url: str) -> None:
        res = self.call("Page.navigate", {"url": url}, session=True)
        assert "errorText" not in res, f"{url}: {res.get('errorText')}"
        self.wait("document.readyState === 'complete'")

    def js(self, expr: str) -> Any:
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True},
                      session=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"JS error in {expr!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 30) -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {expr!r}")

    def screenshot(self, path: Path) -> None:
        import base64
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False}, session=True)
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (EOFError, TimeoutError, OSError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)
        shutil.rmtree(self.user_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    exe, why = find_chromium()
    if exe is None:
        pytest.skip(f"SKIPPED browser tests: {why}")
    b = Browser(exe)
    yield b
    b.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from sae.analysis.dashboard import DashboardConfig, build_dashboard
    from tests.test_dashboard import make_analysis
    root = tmp_path_factory.mktemp("browser_dash")
    paths = make_analysis(root)
    return build_dashboard(DashboardConfig(analysis=str(paths["analysis"]), out=str(root / "site"), progress=False))


def test_dashboard_renders_searches_and_links_work(browser: Browser, site: Path, tmp_path: Path) -> None:
    import numpy as np
    from sae.analysis.top_contexts import load_top_contexts
    tc = load_top_contexts(site.parent.parent / "analysis")
    browser.errors.clear()
    browser.goto(site.as_uri())
    assert browser.js("document.querySelectorAll('#latents tbody tr').length") == 24
    assert browser.js("document.querySelectorAll('svg.chart').length") >= 2  # density + training curves
    assert browser.js("document.getElementById('count').textContent") == "24 of 24 latents"
    # search by label: only latent 0 is labelled with 'brackets'; by number: '3' matches latents 3 and 13, 23
    browser.js("var s = document.getElementById('search'); s.value = 'BRACKETS cats'; "
               "s.dispatchEvent(new Event('input')); 0")
    visible = browser.js("Array.from(document.querySelectorAll('#latents tbody tr td:first-child'))"
                         ".map(td => td.textContent)")
    assert visible == ["0"]
    browser.js("var s = document.getElementById('search'); s.value = '3'; s.dispatchEvent(new Event('input')); 0")
    assert browser.js("Array.from(document.querySelectorAll('#latents tbody tr td:first-child'))"
                      ".map(td => td.textContent)") == ["3", "13", "23"]
    browser.js("var s = document.getElementById('search'); s.value = ''; s.dispatchEvent(new Event('input')); "
               "document.querySelector('th[data-key=freq]').click(); 0")  # sort by firing frequency, largest first
    top = browser.js("document.querySelector('#latents tbody tr td:first-child').textContent")
    assert int(top) == int(np.argmax(tc.array("freq")))
    browser.js("var s = document.getElementById('search'); s.value = 'brackets'; s.dispatchEvent(new Event('input')); 0")
    browser.screenshot(tmp_path / "index.png")
    assert (tmp_path / "index.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # follow the link like a user, then the pager
    browser.js("document.querySelector('#latents tbody tr a').click(); 0")
    browser.wait("location.pathname.endsWith('/latent.html') && location.hash === '#0' && "
                 "document.querySelector('h1') !== null")
    assert browser.js("document.querySelector('h1').textContent") == "Latent 0: angle <brackets> & cats"
    assert browser.js("document.querySelector('.desc').textContent") == "fires on <cat>"
    assert browser.js("document.querySelectorAll('#latent script, #latent cat').length") == 0  # text, not markup
    live = int(np.argmax(tc.array("freq")))
    browser.goto(site.parent.as_uri() + f"/latent.html#{live}")
    browser.wait(f"document.querySelector('h1') && document.querySelector('h1').textContent.startsWith('Latent {live}')")
    rec = tc.latent(live)
    peak = browser.js("var t = document.querySelector('#max .ctx .t.pk'); [t.dataset.act, t.style.background]")
    assert float(peak[0]) == pytest.approx(rec["max_act"], rel=2e-3) and peak[1] == "rgb(255, 120, 0)"  # alpha 1
    shown = browser.js("Array.from(document.querySelectorAll('#max .ctx:first-child .t')).map(t => t.textContent)")
    top = rec["max"][0]
    assert "".join(shown) in "".join(t.replace("\n", "\u21b5") for t in top["tokens"])
    assert browser.js("document.querySelectorAll('.ctx').length") > 0
    browser.screenshot(tmp_path / "latent.png")
    browser.goto(site.parent.as_uri() + "/latent.html#0")
    browser.wait("document.querySelector('h1') && document.querySelector('h1').textContent.startsWith('Latent 0')")
    browser.js("document.getElementById('next').click(); 0")
    browser.wait("location.hash === '#1' && document.querySelector('h1').textContent.startsWith('Latent 1')")
    # every link of the overview and of one latent page opens a page with a heading
    for page in (site.as_uri(), site.parent.as_uri() + "/latent.html#5"):
        browser.goto(page)
        browser.wait("document.querySelector('h1') !== null")
        for href in browser.js("Array.from(document.querySelectorAll('a')).map(a => a.href)"):
            browser.goto(href)
            browser.wait("document.querySelector('h1') !== null")
    assert browser.errors == []


def test_steering_ui_in_the_browser(browser: Browser) -> None:
    from llama.generate import generate
    from tests.test_steer import CharTokenizer, Label, start_server, tiny_model, tiny_sae
    model, sae = tiny_model(), tiny_sae()
    server = start_server(model, sae, {7: Label("dog things"), 9: Label("cats")})
    try:
        browser.errors.clear()
        browser.goto(server.url)
        browser.wait("document.getElementById('hook').textContent.includes('96 latents')")
        browser.js("var f = document.getElementById('find'); f.value = 'dog'; f.dispatchEvent(new Event('input')); 0")
        browser.wait("document.getElementById('found').options.length === 1")
        browser.js("document.getElementById('add').click(); 0")
        assert browser.js("document.querySelector('#steers .steer b').textContent") == "latent 7"
        browser.js("document.querySelector('#steers .steer input').value = '40'; "
                   "var p = document.getElementById('prompt'); p.value = 'ABC'; "
                   "document.getElementById('max_new_tokens').value = '10'; document.getElementById('go').click(); 0")
        browser.wait("document.getElementById('status').textContent === 'done'", timeout=60)
        steered = browser.js("document.getElementById('out-steered').textContent")
        clean = browser.js("document.getElementById('out-clean').textContent")
        tok = CharTokenizer()
        plain = generate(model, tok, [tok.encode("ABC")], 10, temperature=0.0).tokens[0]
        assert clean == tok.decode(plain)
        assert steered != clean and len(steered) == 10
        assert "7 (dog things)" in browser.js("document.querySelector('#out-steered span').title")
        # invalid input is refused with a message, not a crash
        browser.js("document.getElementById('max_new_tokens').value = '100000'; document.getElementById('go').click(); 0")
        browser.wait("document.getElementById('error').textContent.includes('max_new_tokens')")
        errors = [e for e in browser.errors if "400" not in e]  # the refused request itself is logged by Chromium
        assert errors == []
    finally:
        server.shutdown()
        server.server_close()
