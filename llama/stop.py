"""Ctrl-C (SIGINT) and SIGTERM in long training loops: finish the step, write a checkpoint, say how to resume.

    with StopSignals() as stop:
        for step in ...:
            train_step()
            if stop:                       # a signal arrived during this step
                save_checkpoint()
                break
    if stop:
        print(f"resume with: {rerun_command()}")

The first signal only sets the flag (and says so at once, on its own line). A second Ctrl-C quits at once without
a checkpoint, except under torchrun: there the terminal's SIGINT and the one torchrun forwards reach every worker
together, so repeats are ignored (torchrun kills workers that have not exited after its --shutdown-timeout, 30 s).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from typing import Any, Callable, Sequence

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def say_on_own_line(msg: str) -> None:
    """Print to stderr on a line of its own, even while a tqdm bar is drawn there."""
    try:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr, flush=True)


class StopSignals:
    """A context manager whose truth value says whether SIGINT or SIGTERM arrived since it was entered."""

    def __init__(self, say: Callable[[str], None] = say_on_own_line, second_quits: bool | None = None) -> None:
        self.say, self.signum = say, None
        self.second_quits = not under_torchrun() if second_quits is None else second_quits
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT and self.second_quits:
                raise KeyboardInterrupt
            return
        self.signum = signum
        again = " (Ctrl-C again to quit at once, without one)" if self.second_quits else ""
        self.say(f"{self.name}: stopping after this step and writing a checkpoint{again}")

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130 for Ctrl-C)."""
        return 128 + int(self.signum or 0)


def rerun_command(add: str = "--resume", drop: Sequence[str] = ("--overwrite",), argv: Sequence[str] | None = None
                  ) -> str:
    """The command line that started this process (torchrun's included), with boolean flag `add` set and the
    boolean flags in `drop` removed: the exact command that resumes the run."""
    import shlex
    args = list(sys.argv if argv is None else argv)
    script, rest, out = args[0], args[1:], []
    i = 0
    while i < len(rest):
        flag = rest[i].split("=", 1)[0]
        if flag == add or flag in drop:
            has_value = "=" not in rest[i] and i + 1 < len(rest) and not rest[i + 1].startswith("--")
            i += 2 if has_value else 1
            continue
        out.append(rest[i])
        i += 1
    out.append(add)
    if under_torchrun():
        nproc = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
        head = ["torchrun", f"--nproc_per_node={nproc}"]
        if os.environ.get("WORLD_SIZE", nproc) != nproc:
            head.append("<your --nnodes/--rdzv flags>")
    else:
        python = next((n for n in ("python", "python3") if shutil.which(n) and
                       os.path.abspath(shutil.which(n)) == os.path.abspath(sys.executable)), sys.executable)
        head = [shlex.quote(python)]
    return " ".join([*head, shlex.join([script, *out])])
