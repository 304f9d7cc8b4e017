"""Small stdlib helpers shared by every script: dataclass -> argparse flags, one-line user errors, atomic writes.

A script's config is a dataclass; its fields (name, type, default, `help` metadata) are the single source of the
CLI flags and defaults, and the resolved config is saved as JSON beside every output.

    @dataclass
    class CaptureConfig:
        model: str = field(default="weights/tiny", metadata={"help": "model folder"})
        batch_size: int = 32

    def main(argv=None):
        cfg = parse_config(CaptureConfig, argv, description=__doc__)
        ...

    if __name__ == "__main__":
        run_main(main)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]  # the checkout: repo-relative defaults (weights/tiny) resolve here


def repo_path(path: str | os.PathLike) -> Path:
    """A path naming a file of the checkout (weights/tiny, weights/tiny/heldout.txt), usable from any folder: as
    given when it exists from the current folder or is absolute, else the same relative path inside REPO when that
    exists there, else unchanged (so the caller's error names the path the user typed)."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not str(path):
        return p
    return REPO / p if (REPO / p).exists() else p


class _LineWriter:
    """A progress bar's stream when stderr is not a terminal: each refresh becomes one plain line (no \\r)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").rstrip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Any = None, **kw: Any) -> Any:
    """tqdm on a terminal; elsewhere (CI logs, output piped to a file) a plain line at most every 30 s."""
    from tqdm import tqdm
    stream = kw.pop("file", None) or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kw.update(file=_LineWriter(stream), mininterval=max(float(kw.get("mininterval", 0.1)), 30.0),
                  maxinterval=max(float(kw.get("maxinterval", 10.0)), 60.0), dynamic_ncols=False)
    return tqdm(iterable, **kw)


def _close_progress_bars() -> None:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class UserError(Exception):
    """A problem with the user's input (file, argument, data). Scripts print it as one line, no traceback."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _str2bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the script docstring's line breaks; append the default unless the help text already states one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, "", [], (), argparse.SUPPRESS) \
                or action.option_strings == ["-h", "--help"]:
            return text
        return f"{text} (default: %(default)s)".strip()


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """Turn a dataclass into an ArgumentParser: one `--field-name` flag per field, defaults from the dataclass."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata.get("help", f.name.replace("_", " "))}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        origin = typing.get_origin(tp)
        if tp is bool:
            kw.update(type=_str2bool, nargs="?", const=True, metavar="BOOL")
        elif origin in (list, tuple):
            (inner, *_) = typing.get_args(tp) or (str,)
            kw.update(type=inner if inner in (int, float, str) else str, nargs="*")
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            kw["type"] = str
        if default is None and not optional and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            kw["required"] = True
        parser.add_argument(flag, **kw)
    return parser


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse argv (default sys.argv[1:]) into an instance of the dataclass `cls`."""
    ns = build_parser(cls, description).parse_args(argv)
    values = vars(ns)
    hints = typing.get_type_hints(cls)
    for name, v in list(values.items()):
        tp, _ = _unwrap_optional(hints[name])
        if typing.get_origin(tp) is tuple and isinstance(v, list):
            values[name] = tuple(v)
    return cls(**values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Call write(file) on a temp file in the same folder, fsync, rename: readers never see half a file.
    The file gets the mode a plain open() would give it (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Save the resolved config dataclass as JSON (beside the output it produced)."""
    atomic_write_json(path, config_to_dict(cfg))


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a script's main(); a UserError (or a missing file) becomes one clear line on stderr and exit code 2."""
    try:
        rc = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _close_progress_bars()  # so "interrupted" gets a line of its own, not the end of a bar's
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
