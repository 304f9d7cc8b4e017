"""The README's promises to a new user, run as written: after its install command the API block works from any
folder (verbatim, in a fresh interpreter whose current folder is a temporary one), the scripts run from there too,
and .ci/run runs exactly the README's test command.

These tests need the README's install (`pip install -e . --no-deps`) in the interpreter running the suite, as CI
and the README's test command do; without it they fail and say so."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}


def fenced(section: str, lang: str) -> list[str]:
    """The ```lang blocks between the heading `section` and the next heading of the same level."""
    level = section.split(" ")[0]
    start = README.index(section + "\n")
    nxt = re.search(rf"^{re.escape(level)} ", README[start + len(section):], flags=re.M)
    body = README[start: start + len(section) + nxt.start()] if nxt else README[start:]
    return re.findall(rf"^```{lang}\n(.*?)^```", body, flags=re.S | re.M)


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=timeout)


def require_install(cwd: Path) -> None:
    r = run([sys.executable, "-c", "import llama, sae, kernels; print(llama.__file__, sae.__file__)"], cwd)
    hint = (f"{sys.executable} does not import this checkout's packages from another folder; run the README's "
            f"install (`pip install -e . --no-deps` in {ROOT}) in this interpreter's environment")
    assert r.returncode == 0, f"{hint}\n{r.stderr[-1500:]}"
    files = r.stdout.split()
    assert all(Path(f).resolve().is_relative_to(ROOT) for f in files), f"{hint} (it imports {files})"


def test_readme_api_block_runs_verbatim_from_another_folder(tmp_path: Path) -> None:
    require_install(tmp_path)
    (block,) = fenced("## The API in ten lines", "python")
    assert 'llama.load_model("weights/tiny"' in block and 'sae.load("runs/sae/sae")' in block
    # the block loads the SAE that the README's train command writes: make it here, with the README's commands
    # from the table (tiny-model column) run from this folder, the training shortened
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (capture|train) \| `([^`]*)` \|", README, flags=re.M)}
    for stage, extra in (("capture", ["--progress", "false"]), ("train", ["--steps", "30", "--progress", "false"])):
        argv = rows[stage].split()
        assert argv[:2] == ["python", f"scripts/{stage if stage == 'capture' else 'train_sae'}.py"], argv
        r = run([sys.executable, str(ROOT / argv[1]), *argv[2:], *extra], tmp_path)
        assert r.returncode == 0, f"{rows[stage]}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
    assert (tmp_path / "runs/sae/sae/cfg.json").is_file()
    generation = re.search(r"^Generation: `(llama\.generate\.text_completion\([^`]*\))`", README, flags=re.M)
    assert generation is not None
    check = ("\nassert acts.shape == (1, tokens.shape[1], model.args.dim) and logits.shape[-1] == model.args.vocab_size"
             "\nassert top_indices.shape == (tokens.shape[1], ae.cfg.k)"
             f"\ndone = {generation.group(1)}\nprint('generated', repr(done[0].text))")
    r = run([sys.executable, "-c", block + check], tmp_path)
    assert r.returncode == 0, f"{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
    assert r.stdout.startswith("generated ")
    assert not (tmp_path / "weights").exists()  # the embedded model came from the checkout, nothing was copied


def test_scripts_find_the_embedded_model_from_another_folder(tmp_path: Path) -> None:
    r = run([sys.executable, str(ROOT / "scripts/generate.py"), "--prompt", "Return the", "--max-new-tokens", "4",
             "--temperature", "0"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("Return the") and "no checkpoint" not in r.stderr


def test_ci_runs_the_readme_test_command() -> None:
    blocks = fenced("## Set-up: the two commands", "bash")
    test_cmd = [b.strip() for b in blocks if "pytest" in b]
    assert len(test_cmd) == 1 and "pip install -e . --no-deps" in test_cmd[0]
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert test_cmd[0] in ci
    assert all("pip install -e . --no-deps" in b for b in blocks)  # both set-ups install the packages
