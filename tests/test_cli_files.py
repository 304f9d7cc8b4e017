"""llama.cli's file helpers: atomic writes give files the mode a plain open() would (the umask's, not mkstemp's
private 0600), and repo-relative paths (weights/tiny) resolve from any folder."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from llama.cli import REPO, atomic_write_bytes, atomic_write_json, current_umask, repo_path


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_writes_follow_the_umask(tmp_path: Path, umask) -> None:
    from sae import SAE, SAEConfig, save
    for mask in (0o022, 0o002, 0o077):
        umask(mask)
        assert current_umask() == mask
        plain = tmp_path / f"plain-{mask:o}"
        plain.write_bytes(b"x")  # what open() gives, the reference
        atomic_write_bytes(tmp_path / f"a-{mask:o}.bin", b"data")
        atomic_write_json(tmp_path / f"a-{mask:o}.json", {"a": 1})
        for f in (f"a-{mask:o}.bin", f"a-{mask:o}.json"):
            assert mode(tmp_path / f) == mode(plain) == 0o666 & ~mask, f
    umask(0o022)
    sae_dir = save(SAE(SAEConfig(d_in=4, n_latents=8, k=2)), tmp_path / "sae")  # SAE files are shareable too
    assert {f.name: mode(f) for f in sae_dir.iterdir()} == {f.name: 0o644 for f in sae_dir.iterdir()}
    assert not list(tmp_path.glob(".*.tmp"))


def test_repo_paths_resolve_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert repo_path("weights/tiny") == REPO / "weights/tiny"
    assert repo_path("weights/tiny/heldout.txt").is_file()
    (tmp_path / "weights" / "tiny").mkdir(parents=True)  # a folder of the same name here wins
    assert repo_path("weights/tiny") == Path("weights/tiny")
    assert repo_path("nowhere/x") == Path("nowhere/x")  # neither here nor in the checkout: left as typed
    assert repo_path(tmp_path) == tmp_path
