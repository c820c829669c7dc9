"""A full disk, for real: a small tmpfs mounted as the results folder (root only; skipped elsewhere with the reason).

A write that finds no space says which folder is full, how much is free there and how much it needed; a run whose
results cannot be written goes on with its other cells, ends with exit code 1 and no traceback, and the same command
finishes the grid once there is space again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from kdbench.preflight import space_warnings
from kdbench.results.store import StorageFull, atomic_write_text


def _mount_tmpfs(folder: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` on ``folder``; why not, when it cannot be done here."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    return None if mounted.returncode == 0 else f"mount -t tmpfs failed: {mounted.stderr.strip()}"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``small_disk(size)``: a folder on a tmpfs of ``size`` (``remount(folder, size)`` grows it)."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        why = _mount_tmpfs(folder, size)
        if why is not None:
            pytest.skip(why)
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_write_to_a_full_disk_names_the_folder_its_free_space_and_the_write(
        small_disk: Callable[[str], Path]) -> None:
    disk = small_disk("16k")
    atomic_write_text(disk / "small.txt", "fits")
    with pytest.raises(StorageFull) as info:
        atomic_write_text(disk / "cells" / "big.json", "x" * 100_000)
    message = str(info.value)
    assert f"no space left for a write of 100,000 bytes to {disk / 'cells' / 'big.json'}" in message
    assert f"bytes free on the filesystem of {disk / 'cells'}" in message and "run the same command again" in message
    assert sorted(p.name for p in (disk / "cells").iterdir()) == []  # no temporary file left behind
    assert (disk / "small.txt").read_text() == "fits"


def test_the_preflight_warns_of_a_filesystem_with_less_free_space_than_the_run_may_write(
        tmp_path: Path, small_disk: Callable[[str], Path]) -> None:
    disk = small_disk("64k")
    out, cache = disk / "results", disk / "cache"  # not made yet: the filesystem is that of the nearest folder
    assert space_warnings(out, 8 * 1024, cache, 8 * 1024) == []
    (warning,) = space_warnings(out, 40 * 1024, cache, 40 * 1024)  # each fits, together they do not
    assert warning.startswith(f"{out} and {cache}: the run may write up to 0.08 MiB")
    assert "MiB free" in warning and "--out or --cache-dir" in warning
    (warning,) = space_warnings(out, 2**20, tmp_path / "elsewhere", 2**20)  # only the small filesystem is short
    assert warning.startswith(f"{out}: ")


@pytest.mark.slow
def test_a_run_whose_results_folder_is_full_goes_on_says_why_and_finishes_once_there_is_space(
        tmp_path: Path, small_disk: Callable[[str], Path], subprocess_env: Callable[..., dict[str, str]],
        small_experiment: Callable[..., dict]) -> None:
    out = small_disk("8k")  # two pages: not even one cell's files fit
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(small_experiment("full", {"sft": {}, "kd": {}}), sort_keys=False))
    command = [sys.executable, "-m", "kdbench", "run", "-e", str(tmp_path / "full.yaml"), "--out", str(out)]
    env = subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    full = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    said = " ".join(full.stderr.split())
    assert full.returncode == 1, full.stderr[-4000:]
    assert "Traceback" not in full.stderr
    for cell in ("gpt2/teacher/teacher/seed0", "gpt2/s1/sft/seed0", "gpt2/s1/kd/seed0"):  # every cell was tried
        assert f"{cell}: its result could not be written" in said, said[-3000:]
    assert "no space left for a write of" in said and "bytes free on the filesystem of" in said
    assert "unfinished: 3 cell(s) whose results could not be written" in said
    assert f"{out}: the run may write up to" in said  # the pre-flight warning, before any cell

    subprocess.run(["mount", "-o", "remount,size=10m", str(out)], check=True)
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    results = [json.loads(path.read_text()) for path in sorted(out.glob("cells/**/result.json"))]
    assert [r["status"] for r in results] == ["ok"] * 3
