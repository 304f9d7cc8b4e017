"""The package layout keeps its promises: import rules between the parts, and progress output fit for logs."""
from __future__ import annotations

import ast
import io
import subprocess
import sys
from pathlib import Path

from llama.cli import progress_bar

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    """module file -> every module it imports (at any depth in the file)."""
    out: dict[str, set[str]] = {}
    for f in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        out[str(f.relative_to(ROOT))] = names
    return out


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f}: {n}" for f, names in imported_modules(package).items() for n in sorted(names)
            if any(n == p or n.startswith(p + ".") for p in forbidden)]


def test_llama_never_imports_sae() -> None:
    assert offenders("llama", ("sae", "kernels")) == []


def test_activations_depend_on_llama_only() -> None:
    allowed = ("sae.activations",)
    bad = [o for o in offenders("sae.activations", ("sae",)) if not o.split(": ")[1].startswith(allowed)]
    assert bad == []


def test_analysis_never_imports_steering() -> None:
    assert offenders("sae.analysis", ("sae.steering",)) == []


def test_store_does_not_import_source() -> None:  # source.py imports store.py; the reverse would be a loop
    names = imported_modules("sae.activations")["sae/activations/store.py"]
    assert not any(n.startswith("sae.activations.source") for n in names)


def test_public_entry_points_import_in_a_fresh_interpreter() -> None:
    code = ("import llama, sae; from sae.activations.store import open_store; from sae.steering.steer import SAESplice;"
            "print(llama.load_model.__name__, llama.Tokenizer.__name__, sae.load.__name__, sae.save.__name__,"
            " sae.SAE.__name__, sae.TensorSource.__name__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["load_model", "Tokenizer", "load", "save", "SAE", "TensorSource"]


def test_progress_bar_writes_plain_lines_when_not_a_terminal() -> None:
    buf = io.StringIO()  # not a tty, like a CI log or a pipe
    for _ in progress_bar(range(5000), desc="work", file=buf):
        pass
    text = buf.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3 and "5000/5000" in lines[-1] and lines[-1].startswith("work")
