"""Ctrl-C never loses work, and one --out folder never mixes two SAEs: real training subprocesses get a real SIGINT
(on a terminal, through a pty, so the progress bar is the one a user sees), under torchrun a signal on one rank
only; the printed resume command is run as printed; re-training into a used folder is refused or cleans it."""
from __future__ import annotations

import json
import os
import pty
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from llama.cli import UserError
from llama.stop import rerun_command
from sae import TensorSource
from sae.config import TrainConfig
from sae.train import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


class Terminal:
    """A child process whose stdout and stderr are one pty (a terminal: tqdm draws its bar with \\r)."""

    def __init__(self, cmd: list[str], cwd: Path) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(cmd, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, cwd=cwd, env=ENV)
        os.close(slave)
        self.raw = b""
        self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            self.raw += chunk
        os.close(fd)

    def wait_for(self, cond: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not cond():
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}):\n{self.text}"
            assert time.time() < deadline, f"timed out:\n{self.text}"
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace")

    def screen_lines(self) -> list[str]:
        """The lines as a terminal shows them: each line is what follows its last carriage return."""
        return [ln.rsplit("\r", 1)[-1].rstrip() for ln in self.text.replace("\r\n", "\n").split("\n")]


def stopped_line(lines: list[str], signame: str = "SIGINT") -> tuple[int, int]:
    hit = [ln for ln in lines if ln.startswith(f"stopped by {signame} after step ")]
    assert len(hit) == 1, lines[-15:]
    words = hit[0].split()
    return int(words[5]), int(words[7].rstrip(";"))  # "stopped by SIG after step N of M; ..."


def test_sae_training_sigint_checkpoints_says_where_and_resumes(tmp_path: Path) -> None:
    torch.save(torch.randn(4096, 64), tmp_path / "acts.pt")
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts/train_sae.py"), "--store", str(tmp_path / "acts.pt"), "--out", str(out),
           "--n-latents", "1024", "--k", "8", "--batch-size", "256", "--steps", "100000", "--ckpt-every", "0",
           "--log-every", "5", "--val-every", "0", "--init-rows", "512", "--dead-tokens", "5000", "--device", "cpu"]
    term = Terminal(cmd, cwd=tmp_path)
    term.wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2)
    term.proc.send_signal(signal.SIGINT)
    assert term.finish() == 130, term.text
    lines = term.screen_lines()
    assert any(ln.startswith("SIGINT: stopping after this step and writing a checkpoint") for ln in lines), lines[-15:]
    step, total = stopped_line(lines)
    assert total == 100000 and step >= 10
    assert f"checkpoint written to {out / 'checkpoint.pt'}" in term.text
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == step  # the step that was running finished and is in the checkpoint
    assert not (out / "sae").exists() and "Traceback" not in term.text
    resume = [ln for ln in lines if ln.startswith("resume with: ")]
    assert len(resume) == 1
    argv = shlex.split(resume[0].removeprefix("resume with: "))
    assert argv[1:] == cmd[1:] + ["--resume"]
    # the printed command works as printed (ending the run 3 steps later instead of at step 100000)
    r = subprocess.run(resume[0].removeprefix("resume with: ") + f" --steps {step + 3} --progress false", shell=True,
                       capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == step + 3 and len(set(steps)) == len(steps)
    assert json.loads((out / "sae" / "cfg.json").read_text())["llama_sae"]["train_steps"] == step + 3


def test_resume_with_nothing_to_resume_is_an_error(tmp_path: Path) -> None:
    torch.save(torch.randn(600, 8), tmp_path / "acts.pt")
    r = subprocess.run([sys.executable, str(ROOT / "scripts/train_sae.py"), "--store", str(tmp_path / "acts.pt"),
                        "--out", str(tmp_path / "run"), "--resume", "--steps", "3", "--batch-size", "64"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --resume: nothing to resume") and "checkpoint.pt does not exist" in r.stderr
    assert not (tmp_path / "run" / "sae").exists()
    from llama.tiny.train import TrainConfig as TinyConfig
    from llama.tiny.train import train as train_tiny
    corpus = tiny_corpus(tmp_path)
    with pytest.raises(UserError, match="--resume: nothing to resume"):
        train_tiny(TinyConfig(out=str(tmp_path / "tiny"), corpus=str(corpus), resume=True, **dict(TINY)))


def test_torchrun_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """SIGTERM reaches rank 1 only (as when a scheduler signals one process): both ranks still stop after the
    same step (else the other one would hang in the gradient all-reduce), and rank 0 writes the checkpoint."""
    torch.save(torch.randn(4096, 32), tmp_path / "acts.pt")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts/train_sae.py"), "--store", str(tmp_path / "acts.pt"), "--out", str(out),
           "--n-latents", "512", "--k", "8", "--batch-size", "256", "--steps", "100000", "--ckpt-every", "0",
           "--log-every", "5", "--val-every", "0", "--init-rows", "512", "--progress", "false", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=tmp_path)
    try:
        deadline = time.time() + 180
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        rank1 = [pid for pid in _children(proc.pid) if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGTERM)
        text, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped by a signal on another rank after step " in text, text[-3000:]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    step = int(text.split("stopped by a signal on another rank after step ")[1].split()[0])
    assert ck["step"] == step
    assert f"resume with: torchrun --nproc_per_node=2 {ROOT / 'scripts/train_sae.py'}" in text


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


TINY = {"steps": 1500, "dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 400, "seq_len": 16,
        "batch_size": 2, "eval_every": 100, "eval_windows": 4, "warmup": 2, "sample_tokens": 0}


def tiny_corpus(tmp_path: Path) -> Path:
    """Real text (the tiny model's held-out file) re-cut into 12-word documents."""
    lines = (ROOT / "weights/tiny/heldout.txt").read_text(encoding="utf-8").splitlines()[:300]
    words = " ".join(lines).split()
    path = tmp_path / "corpus.txt"
    path.write_text("".join(" ".join(words[i:i + 12]) + "\n" for i in range(0, len(words), 12)), encoding="utf-8")
    return path


def test_tiny_llama_training_sigint_then_resume_is_bit_identical(tmp_path: Path) -> None:
    corpus = tiny_corpus(tmp_path)
    flags = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    base = [sys.executable, str(ROOT / "scripts/train_tiny_llama.py"), "--corpus", str(corpus), *flags]
    term = Terminal([*base, "--out", str(tmp_path / "a")], cwd=tmp_path)
    term.wait_for(lambda: "step 100: batch loss" in term.text)
    term.proc.send_signal(signal.SIGINT)
    assert term.finish() == 130, term.text
    lines = term.screen_lines()
    step, total = stopped_line(lines)
    assert 100 <= step < total == TINY["steps"]
    resume = [ln.removeprefix("resume with: ") for ln in lines if ln.startswith("resume with: ")]
    assert len(resume) == 1 and resume[0].endswith(" --resume")
    r = subprocess.run(resume[0], shell=True, capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {tmp_path / 'a' / 'checkpoint.pt'} at step {step}" in r.stdout
    assert not (tmp_path / "a" / "checkpoint.pt").exists()  # a finished run leaves only its files
    r = subprocess.run([*base, "--out", str(tmp_path / "b")], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / o / "consolidated.00.pth", weights_only=True) for o in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ia, ib = (json.loads((tmp_path / o / "train_info.json").read_text()) for o in ("a", "b"))
    assert ia["history"] == ib["history"] and ia["weights_sha256"] == ib["weights_sha256"]


def test_rerun_command_sets_resume_and_drops_overwrite() -> None:
    cmd = rerun_command(argv=["scripts/train_sae.py", "--store", "s", "--overwrite", "--resume", "false", "--k", "4"])
    assert cmd.split(" ", 1)[1] == "scripts/train_sae.py --store s --k 4 --resume"
    cmd = rerun_command(argv=["x.py", "--overwrite=true", "--out", "my dir"])
    assert cmd.endswith("x.py --out 'my dir' --resume")


def small(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(out=str(out), n_latents=32, k=4, batch_size=64, steps=6, log_every=3, val_every=0,
                                 progress=False, init_rows=256, warmup_steps=1, device="cpu"), **kw})


def test_retraining_into_a_used_folder_is_refused_and_overwrite_removes_the_old_sae_results(tmp_path: Path) -> None:
    from sae.analysis.dashboard import DashboardConfig, build_dashboard
    from tests.test_dashboard import make_analysis
    src = TensorSource(torch.randn(1000, 32))
    out = tmp_path / "run"
    train(small(out), src)
    # results of that SAE written into the same folder: evaluation, an analysis, a dashboard
    (out / "sae" / "eval.json").write_text('{"fvu": 0.5}')
    made = make_analysis(tmp_path / "an", n_latents=8, labels=False)
    (made["analysis"]).rename(out / "analysis")
    build_dashboard(DashboardConfig(analysis=str(out / "analysis"), out=str(out / "dashboard"), progress=False))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already holds a training run.*--resume.*--overwrite"):
        train(small(out, seed=1), src)
    assert (out / "sae" / "eval.json").is_file()  # refused: nothing was touched
    res = train(small(out, seed=1, overwrite=True), src)
    assert res.step == 6
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "notes.txt", "sae",
                                                      "train_config.json"]
    assert sorted(p.name for p in (out / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    with pytest.raises(UserError, match="give one of them"):
        train(small(out, resume=True, overwrite=True), src)
