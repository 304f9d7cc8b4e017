"""The guides' machinery: run every ```python snippet of a guide and compare what it prints with the ```text block
shown after it, and check that every link into the code still points at what it names. tests/test_docs.py runs
`check`; authors use the other two commands after editing a guide or the code it links to.

    python docs/doctools.py check docs/llama.md docs/sae.md      # what the test runs: snippets, outputs, links
    python docs/doctools.py update docs/llama.md                 # rerun and rewrite the shown outputs
    python docs/doctools.py fix-links docs/llama.md docs/sae.md  # move stale #L anchors back onto their symbols

Snippets of one guide run top to bottom in one namespace (a later one may use an earlier one's names), from the
repository root. A snippet that prints must be followed by a ```text block showing what it prints. The shown output
is compared exactly, unless an HTML comment right above the snippet says otherwise:
    <!-- doctest: approx -->            numbers with a decimal point may differ by one unit in their last printed
                                        digit or by rtol (default 1e-3); everything else, integers included, exactly
    <!-- doctest: approx rtol=0.05 -->  the same with another rtol
There is deliberately no "skip": a snippet in a guide runs.

Links: `[`symbol`](../llama/model.py#L40-L60)`: the file exists, the lines exist, and the first code span of the
link text names what is there: a (dotted) definition the range lies inside (`Attention.forward`, `RMSNorm`), else
text that appears in those lines (`k.repeat_interleave`). Links to other files and to headings (#anchor) must
resolve too.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import io
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python docs/doctools.py`: the snippets import this checkout's llama and sae
    sys.path.insert(0, str(ROOT))
FENCE = re.compile(r"^```(\w*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*doctest:(.*?)-->\s*$")
LINK = re.compile(r"\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")
LINE_ANCHOR = re.compile(r"^L(\d+)(?:-L(\d+))?$")
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
IDENTIFIER = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


class Snippet(NamedTuple):
    line: int  # 1-based line of the ```python fence
    code: str
    end: int  # 0-based index of the closing fence's line
    expected: str | None  # the ```text block after it, if any
    text_span: tuple[int, int] | None  # 0-based [open fence, close fence] lines of that block
    options: dict[str, Any]


class Result(NamedTuple):
    snippet: Snippet
    output: str
    error: str | None  # the traceback, when the snippet raised
    seconds: float


# ------------------------------------------------------------------------------------------------- parsing
def parse(text: str) -> list[Snippet]:
    lines = text.split("\n")
    blocks: list[tuple[str, int, int]] = []  # (language, open line, close line), 0-based
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            j = i + 1
            while j < len(lines) and not re.match(r"^```\s*$", lines[j]):
                j += 1
            if j == len(lines):
                raise ValueError(f"line {i + 1}: code fence never closed")
            blocks.append((m.group(1), i, j))
            i = j
        i += 1
    snippets = []
    for n, (lang, start, end) in enumerate(blocks):
        if lang != "python":
            continue
        options = _options(lines, start)
        expected, span = None, None
        if n + 1 < len(blocks) and blocks[n + 1][0] == "text" \
                and all(not ln.strip() for ln in lines[end + 1: blocks[n + 1][1]]):
            _, t0, t1 = blocks[n + 1]
            expected, span = "\n".join(lines[t0 + 1: t1]), (t0, t1)
        snippets.append(Snippet(start + 1, "\n".join(lines[start + 1: end]), end, expected, span, options))
    return snippets


def _options(lines: list[str], fence: int) -> dict[str, Any]:
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    m = DIRECTIVE.match(lines[j]) if j >= 0 else None
    if not m:
        return {}
    opts: dict[str, Any] = {}
    for word in m.group(1).split():
        key, _, value = word.partition("=")
        if key not in ("approx", "rtol"):
            raise ValueError(f"line {j + 1}: unknown doctest option {word!r} (known: approx, rtol=X)")
        opts[key] = float(value) if value else True
    if "rtol" in opts:
        opts["approx"] = True
    return opts


# ------------------------------------------------------------------------------------------------- running
def run(path: Path, snippets: list[Snippet] | None = None, namespace: dict[str, Any] | None = None) -> list[Result]:
    """Run a guide's snippets in order in one namespace (a fresh one unless given), from the repository root.
    Stops at the first error (later snippets build on earlier ones). Tracebacks name the guide's own lines."""
    import torch  # every guide uses it; its global state is restored after the guide
    snippets = parse(path.read_text(encoding="utf-8")) if snippets is None else snippets
    namespace = {"__name__": "__guide__"} if namespace is None else namespace
    results = []
    grad = torch.is_grad_enabled()
    with contextlib.chdir(ROOT), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same start whatever ran before
        try:
            _run_all(path, snippets, namespace, results)
        finally:
            torch.set_grad_enabled(grad)  # a guide may switch autograd off for all its snippets
    return results


def _run_all(path: Path, snippets: list[Snippet], namespace: dict[str, Any], results: list[Result]) -> None:
    for s in snippets:
        buf = io.StringIO()
        t0 = time.perf_counter()
        error = None
        try:
            code = compile("\n" * s.line + s.code, str(path), "exec")  # line numbers = the guide's
            with contextlib.redirect_stdout(buf):
                exec(code, namespace)
        except Exception:  # noqa: BLE001  (any failure of a snippet is reported)
            error = traceback.format_exc()
        except SystemExit:  # a snippet calling sys.exit() is a failure too, not the end of the test run
            error = traceback.format_exc()
        results.append(Result(s, buf.getvalue(), error, time.perf_counter() - t0))
        if error:
            break


def execute(path: Path) -> dict[str, Any]:
    """Run a guide and return its namespace (docs/make_figures.py draws from it); raises if a snippet fails."""
    namespace: dict[str, Any] = {"__name__": "__guide__"}
    for r in run(path, namespace=namespace):
        if r.error:
            raise RuntimeError(f"{_rel(path)}:{r.snippet.line}: the snippet raised:\n{r.error}")
    return namespace


def _clean(text: str) -> str:
    return "\n".join(ln.rstrip() for ln in text.strip("\n").split("\n")).strip("\n")


def same_output(got: str, want: str, options: dict[str, Any] | None = None) -> bool:
    got, want, options = _clean(got), _clean(want), options or {}
    if not options.get("approx"):
        return got == want
    if NUMBER.split(got) != NUMBER.split(want):  # the text around the numbers is exact
        return False
    rtol = float(options.get("rtol", 1e-3))
    for a, b in zip(NUMBER.findall(got), NUMBER.findall(want)):
        if not re.search(r"[.eE]", b):  # an integer (a count, a token id, a shape): exact
            if a != b:
                return False
            continue
        decimals = len(b.split(".")[1].split("e")[0].split("E")[0]) if "." in b else 0
        exponent = int(re.split(r"[eE]", b)[1]) if re.search(r"[eE]", b) else 0
        unit = 10.0 ** (exponent - decimals)  # one unit in the last printed digit
        if abs(float(a) - float(b)) > max(rtol * abs(float(b)), unit * 1.0001):
            return False
    return True


def problems(path: Path, results: list[Result] | None = None) -> list[str]:
    """What is wrong with one guide's snippets: one that raised, an output that differs from the one shown, a
    snippet that prints but shows nothing (`link_problems` checks the links)."""
    snippets = parse(path.read_text(encoding="utf-8"))
    results = run(path, snippets) if results is None else results
    found = []
    for r in results:
        where = f"{_rel(path)}:{r.snippet.line}"
        if r.error:
            skipped = len(snippets) - len(results)
            found.append(f"{where}: the snippet raised{f' ({skipped} later snippets not run)' if skipped else ''}:\n"
                         f"{r.error}")
        elif r.snippet.expected is None and _clean(r.output):
            found.append(f"{where}: the snippet prints but the guide shows no ```text block after it; it printed:\n"
                         f"{r.output}")
        elif r.snippet.expected is not None and not same_output(r.output, r.snippet.expected, r.snippet.options):
            diff = difflib.unified_diff(_clean(r.snippet.expected).split("\n"), _clean(r.output).split("\n"),
                                        "shown in the guide", "printed now", lineterm="")
            found.append(f"{where}: the output differs from the one shown"
                         f"{' (beyond the approx tolerance)' if r.snippet.options.get('approx') else ''}:\n"
                         + "\n".join(diff))
    return found


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------------- links
def links(text: str) -> list[tuple[int, str, str]]:
    """(line, link text, target) of every inline link and image outside code blocks."""
    out, in_code = [], False
    for n, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line) or re.match(r"^```\s*$", line):
            in_code = not in_code
            continue
        if not in_code:
            out += [(n, m.group(1), m.group(2)) for m in LINK.finditer(line)]
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (except - and _), spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    found, in_code, seen = set(), False, {}
    for line in md.read_text(encoding="utf-8").split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#{1,6} (.+)$", line)):
            s = slug(m.group(1))
            found.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return found


def definition(file: Path, dotted: str) -> tuple[int, int] | None:
    """1-based (first line incl. decorators, last line) of a dotted def / class / assigned name in `file`."""
    body: list[ast.stmt] = ast.parse(file.read_text(encoding="utf-8")).body
    node: ast.stmt | None = None
    for part in dotted.split("."):
        node = None
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and stmt.name == part:
                node = stmt
            elif isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == part for t in stmt.targets):
                node = stmt
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == part:
                node = stmt
        if node is None:
            return None
        body = getattr(node, "body", [])
    assert node is not None
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return first, node.end_lineno or node.lineno


def _symbol(link_text: str) -> str | None:
    m = re.search(r"`([^`]+)`", link_text)
    return m.group(1).strip().removesuffix("()") if m else None


def check_line_link(file: Path, a: int, b: int, symbol: str | None) -> str | None:
    """Why the link file#La-Lb naming `symbol` is stale, or None when it is fine."""
    n_lines = len(file.read_text(encoding="utf-8").split("\n"))
    if symbol is None:
        return "a link to lines needs a `code span` in its text naming what is there"
    if not 1 <= a <= b <= n_lines:
        return f"lines {a}-{b} are not in the file ({n_lines} lines)"
    span = definition(file, symbol) if file.suffix == ".py" and IDENTIFIER.match(symbol) else None
    if span is not None:
        if not span[0] <= a <= b <= span[1]:
            return f"`{symbol}` is at lines {span[0]}-{span[1]}, not around {a}-{b}"
        return None
    chunk = "\n".join(file.read_text(encoding="utf-8").split("\n")[a - 1: b])
    if symbol not in chunk:
        return f"`{symbol}` is not in lines {a}-{b}"
    return None


def link_problems(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    found = []
    for line, label, target in links(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        file = (path.parent / file_part).resolve() if file_part else path.resolve()
        where = f"{_rel(path)}:{line}: link [{label}]({target})"
        if not file.exists():
            found.append(f"{where}: {file_part} does not exist")
            continue
        if not anchor:
            continue
        m = LINE_ANCHOR.match(anchor)
        if m:
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            why = check_line_link(file, a, b, _symbol(label))
            if why:
                found.append(f"{where}: {why} (python docs/doctools.py fix-links {_rel(path)})")
        elif file.suffix == ".md" and anchor not in anchors(file):
            found.append(f"{where}: no heading #{anchor} in {_rel(file)}")
    return found


def fix_links(path: Path) -> int:
    """Rewrite stale #La-Lb anchors: a definition's whole extent, or the same number of lines starting at the one
    line holding the text (the occurrence nearest the old anchor). Returns how many links changed."""
    text = path.read_text(encoding="utf-8")
    changed = 0

    def repl(m: re.Match) -> str:
        nonlocal changed
        label, target = m.group(1), m.group(2)
        file_part, _, anchor = target.partition("#")
        la = LINE_ANCHOR.match(anchor)
        file = (path.parent / file_part).resolve()
        symbol = _symbol(label)
        if not la or not file.is_file() or symbol is None:
            return m.group(0)
        a, b = int(la.group(1)), int(la.group(2) or la.group(1))
        if check_line_link(file, a, b, symbol) is None:
            return m.group(0)
        span = definition(file, symbol) if file.suffix == ".py" and IDENTIFIER.match(symbol) else None
        if span is None:
            hits = [n for n, ln in enumerate(file.read_text(encoding="utf-8").split("\n"), 1) if symbol in ln]
            if not hits:
                return m.group(0)
            start = min(hits, key=lambda n: abs(n - a))
            span = (start, start + (b - a))
        changed += 1
        new = f"L{span[0]}" + (f"-L{span[1]}" if span[1] != span[0] else "")
        return f"[{label}]({file_part}#{new})"

    new_text = LINK.sub(repl, text)
    if changed:
        path.write_text(new_text, encoding="utf-8")
    return changed


# -------------------------------------------------------------------------------------------------- update
def update(path: Path) -> list[Result]:
    """Run the guide and write each snippet's output into the ```text block after it (inserting one where a
    snippet prints and shows none; removing one where it prints nothing)."""
    text = path.read_text(encoding="utf-8")
    snippets = parse(text)
    results = run(path, snippets)
    lines = text.split("\n")
    for r in reversed(results):  # bottom up, so earlier line numbers stay valid
        if r.error:
            continue
        out = _clean(r.output)
        block = ["```text", *out.split("\n"), "```"] if out else []
        if r.snippet.text_span is not None:
            t0, t1 = r.snippet.text_span
            lines[t0: t1 + 1] = block
        elif block:
            lines[r.snippet.end + 1: r.snippet.end + 1] = ["", *block]
    path.write_text("\n".join(lines), encoding="utf-8")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["check", "update", "fix-links"])
    p.add_argument("guides", nargs="+", type=Path)
    a = p.parse_args(argv)
    bad = 0
    for guide in a.guides:
        if a.command == "fix-links":
            print(f"{guide}: {fix_links(guide)} link(s) moved")
            continue
        results = update(guide) if a.command == "update" else run(guide)
        for r in results:
            print(f"{guide}:{r.snippet.line}: {r.seconds:.2f} s{'  RAISED' if r.error else ''}", file=sys.stderr)
        found = problems(guide, results) + link_problems(guide) if a.command == "check" else \
            [f"{_rel(guide)}:{r.snippet.line}:\n{r.error}" for r in results if r.error]
        for msg in found:
            print(msg, file=sys.stderr)
        bad += len(found)
        print(f"{guide}: {len(results)} snippets in {sum(r.seconds for r in results):.1f} s, {len(found)} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
