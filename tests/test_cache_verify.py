"""Verified cache entries (issue 30, item 1): what a stage publishes carries the size and sha256 of its files, a run
checks an entry once before using it, a corrupt one is moved aside with a message and built again, and `kdbench
cache verify` checks every entry. The slow tests damage the entries of a real tiny grid and run it again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.grid.cache import StageCache, verify_cache
from kdbench.grid.manifest import MANIFEST, check_entry

RUNS = 0  # builds of the test entry, counted by build()


def build(folder: Path) -> None:
    global RUNS
    RUNS += 1
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text('{"model": "bpe"}')


def published(root: Path, kind: str = "train", key: str = "k1") -> Path:
    return StageCache(root).get_or_build(kind, key, {"label": "test"}, build)[0]


def test_a_published_entry_lists_every_file_with_its_size_and_hash(tmp_path: Path) -> None:
    entry = published(tmp_path)
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["hash"] == "sha256"
    assert sorted(manifest["files"]) == ["inputs.json", "model.safetensors", "sub/tokenizer.json"]
    assert manifest["files"]["model.safetensors"]["size"] == 10240
    assert json.loads((entry / "inputs.json").read_text()) == {"label": "test", "manifest": MANIFEST}
    assert check_entry(entry).state == "ok"


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda e: (e / "model.safetensors").write_bytes(b"x" * 100), "model.safetensors has 100 bytes, 10240 when"),
    (lambda e: (e / "sub" / "tokenizer.json").write_text('{"model": "bpX"}'), "sub/tokenizer.json has the size it was"
     " published with but another sha256"),
    (lambda e: (e / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda e: (e / MANIFEST).unlink(), "manifest.json is missing"),
    (lambda e: (e / MANIFEST).write_text("{not json"), "manifest.json is unreadable (JSONDecodeError"),
    (lambda e: (e / "inputs.json").write_text("{garbled"), "inputs.json is unreadable (JSONDecodeError"),
])
def test_damage_is_named(tmp_path: Path, damage: Callable[[Path], Any], problem: str) -> None:
    entry = published(tmp_path)
    damage(entry)
    verdict = check_entry(entry)
    assert verdict.state == "corrupt" and verdict.problem.startswith(problem), verdict


def test_an_entry_published_before_manifests_is_used_unchecked(tmp_path: Path) -> None:
    entry = published(tmp_path)
    (entry / MANIFEST).unlink()
    (entry / "inputs.json").write_text(json.dumps({"label": "test"}))  # as kdbench wrote it before manifests
    assert check_entry(entry).state == "unverified"
    global RUNS
    RUNS = 0
    assert StageCache(tmp_path).get_or_build("train", "k1", {"label": "test"}, build) == (entry, True)
    assert RUNS == 0


def test_a_corrupt_entry_is_moved_aside_and_built_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry = published(tmp_path)
    good = (entry / "model.safetensors").read_bytes()
    with (entry / "model.safetensors").open("r+b") as handle:
        handle.truncate(100)
    global RUNS
    RUNS = 0
    path, reused = StageCache(tmp_path).get_or_build("train", "k1", {"label": "test"}, build)
    assert (path, reused, RUNS) == (entry, False, 1)
    assert (entry / "model.safetensors").read_bytes() == good and check_entry(entry).state == "ok"
    [aside] = (tmp_path / ".corrupt" / "train").iterdir()
    assert aside.name.startswith("k1-") and (aside / "model.safetensors").stat().st_size == 100
    assert "model.safetensors has 100 bytes" in (aside / "problem.txt").read_text()
    said = capsys.readouterr().err
    assert f"the cache entry {entry} is corrupt (model.safetensors has 100 bytes" in said and str(aside) in said


def test_an_entry_is_checked_once_per_run(tmp_path: Path) -> None:
    entry = published(tmp_path)
    cache = StageCache(tmp_path)
    assert cache.get_or_build("train", "k1", {}, build)[1]
    (entry / "sub" / "tokenizer.json").write_text('{"model": "bpX"}')  # after this run's check: not seen again
    assert cache.get_or_build("train", "k1", {}, build)[1]
    assert not StageCache(tmp_path).get_or_build("train", "k1", {}, build)[1]  # the next run sees it, rebuilds


def test_cache_verify_reports_and_repairs(tmp_path: Path) -> None:
    good, bad, old = published(tmp_path, key="good"), published(tmp_path, key="bad"), published(tmp_path, "init", "old")
    (old / MANIFEST).unlink()
    (old / "inputs.json").write_text("{}")
    (bad / "sub" / "tokenizer.json").write_text("garbled")
    runner = CliRunner()
    checked = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert checked.exit_code == 1, checked.output
    lines = checked.stdout.splitlines()
    assert lines[0] == f"3 cache entries in {tmp_path}: 1 ok, 1 corrupt, 1 without a manifest"
    assert lines[1] == f"corrupt: {bad}: sub/tokenizer.json has 7 bytes, 16 when it was published"
    assert lines[2] == f"without a manifest (used unchecked): {old}"
    assert "kdbench cache verify --repair" in lines[3]
    assert bad.is_dir() and good.is_dir()

    repaired = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path), "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert not bad.exists() and "moved aside to " + str(tmp_path / ".corrupt" / "train" / "bad-") in repaired.stdout
    again = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert again.exit_code == 0 and again.stdout.startswith(f"2 cache entries in {tmp_path}: 1 ok, 0 corrupt, 1 without")
    assert [check.verdict.state for check in verify_cache(StageCache(tmp_path))] == ["unverified", "ok"]


def test_cache_verify_refuses_a_missing_folder(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kdbench", "cache", "verify", "--cache-dir", str(tmp_path / "no")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"the cache folder {tmp_path / 'no'} does not exist" in " ".join(result.stderr.split())


# -- real runs ---------------------------------------------------------------------------------------

def kdbench(root: Path, env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdbench", *arguments], capture_output=True, text=True, timeout=900,
                          cwd=root, env={**env, "KDBENCH_CACHE_DIR": str(root / "cache"), "OMP_NUM_THREADS": "1"})


def run_grid(root: Path, env: dict[str, str], out: str) -> subprocess.CompletedProcess[str]:
    return kdbench(root, env, "run", "-e", str(root / "verified.yaml"), "--out", str(root / out))


def cell_result(root: Path, out: str) -> dict[str, Any]:
    return json.loads((root / out / "cells/gpt2/s1/sft/seed0/result.json").read_text())


def stage_entry(root: Path, env: dict[str, str], cell: str, role: str) -> tuple[Path, str]:
    """The cache entry of the stage that ``cell`` reads as ``role``, found from the dry run's graph, and its kind."""
    plan = json.loads(kdbench(root, env, "run", "-e", str(root / "verified.yaml"), "--dry-run", "--format",
                              "json").stdout)
    stages = {stage["key"]: stage for stage in plan["stages"]}
    key = next(stage for stage in plan["stages"] if stage["label"] == cell and stage["kind"] == "eval")["roles"][role]
    return StageCache(root / "cache").entry(stages[key]["kind"], key), stages[key]["kind"]


def one_line(text: str) -> str:
    return " ".join(text.split())  # rich wraps its lines at the terminal's width


@pytest.mark.slow
def test_a_damaged_cache_heals_and_scores_as_before(tmp_path: Path, subprocess_env: Callable[..., dict[str, str]],
                                                    small_experiment: Callable[..., dict]) -> None:
    (tmp_path / "verified.yaml").write_text(yaml.safe_dump(small_experiment("verified", {"sft": {}}), sort_keys=False))
    env = subprocess_env()
    first = run_grid(tmp_path, env, "out-a")
    assert first.returncode == 0, first.stderr[-3000:]
    untouched = cell_result(tmp_path, "out-a")["metrics"]
    student, kind = stage_entry(tmp_path, env, "gpt2/s1/sft/seed0", "model")
    assert kind == "train" and (student / "model.safetensors").is_file()
    verified = kdbench(tmp_path, env, "cache", "verify")
    entries = len(list(StageCache(tmp_path / "cache").entries()))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith(f"{entries} cache entries in {tmp_path / 'cache'}: {entries} ok, 0 corrupt, 0 "
                                      "without a manifest")

    # A truncated model (a crashed copy, a full disk): moved aside, trained again to the same weights and scores.
    size = (student / "model.safetensors").stat().st_size
    weights = json.loads((student / MANIFEST).read_text())["files"]["model.safetensors"]["sha256"]
    with (student / "model.safetensors").open("r+b") as handle:
        handle.truncate(1000)
    healed = run_grid(tmp_path, env, "out-b")
    assert healed.returncode == 0, healed.stderr[-3000:]
    said = one_line(healed.stderr)
    assert (f"the cache entry {student} is corrupt (model.safetensors has 1000 bytes, {size} when it was published): "
            f"moved aside to {tmp_path / 'cache' / '.corrupt' / 'train' / student.name}-") in said
    assert cell_result(tmp_path, "out-b")["metrics"] == untouched
    assert json.loads((student / MANIFEST).read_text())["files"]["model.safetensors"]["sha256"] == weights
    assert cell_result(tmp_path, "out-b")["validation"] == cell_result(tmp_path, "out-a")["validation"]

    # A garbled tokenizer.json (same size: only its hash tells) and a garbled tokenised split.
    tokenizer = (student / "tokenizer.json").read_bytes()
    (student / "tokenizer.json").write_bytes(b"#" * 64 + tokenizer[64:])
    tokenize = next(entry for entry in (tmp_path / "cache" / "tokenize").iterdir() if not entry.name.startswith("."))
    (tokenize / "train.json").write_text("[{not json")
    checked = kdbench(tmp_path, env, "cache", "verify")
    assert checked.returncode == 1
    assert f"corrupt: {student}: tokenizer.json has the size it was published with but another sha256" in checked.stdout
    assert f"corrupt: {tokenize}: train.json has 10 bytes" in checked.stdout
    healed = run_grid(tmp_path, env, "out-c")
    assert healed.returncode == 0, healed.stderr[-3000:]
    said = one_line(healed.stderr)
    assert f"the cache entry {student} is corrupt (tokenizer.json has the size it was published with but" in said
    assert f"the cache entry {tokenize} is corrupt (train.json has 10 bytes" in said
    assert cell_result(tmp_path, "out-c")["metrics"] == untouched
    assert kdbench(tmp_path, env, "cache", "verify").returncode == 0
    assert len(list((tmp_path / "cache" / ".corrupt").glob("*/*"))) == 3  # kept for a person to look at

    # An entry from before manifests cannot be checked: a file of it that fails to load names the entry and folder.
    (student / MANIFEST).unlink()
    (student / "inputs.json").write_text(json.dumps({"label": "gpt2/s1/sft/seed0"}))
    tokenizer = (student / "tokenizer.json").read_bytes()
    (student / "tokenizer.json").write_bytes(b"#" * 64 + tokenizer[64:])
    entry = f"UnreadableEntry: the cache entry train/{student.name} (gpt2/s1/sft/seed0) at {student} could not be read"
    failed = run_grid(tmp_path, env, "out-d")  # once a run-wide stop (rc 2) advising to log in to the hub
    assert failed.returncode == 1, failed.stderr[-3000:]
    reason = cell_result(tmp_path, "out-d")["failure"]["reason"]
    assert reason.startswith(f"{entry} (the tokenizer: JSONDecodeError: ") and "log in" not in reason, reason
    (student / "tokenizer.json").write_bytes(tokenizer)
    with (student / "model.safetensors").open("r+b") as handle:
        handle.truncate(1000)
    failed = run_grid(tmp_path, env, "out-d")
    assert failed.returncode == 1, failed.stderr[-3000:]
    reason = cell_result(tmp_path, "out-d")["failure"]["reason"]
    assert reason.startswith(f"{entry} (the model: SafetensorError: "), reason
    shutil.rmtree(student)  # as the message advises
    healed = run_grid(tmp_path, env, "out-d")
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert cell_result(tmp_path, "out-d")["metrics"] == untouched
