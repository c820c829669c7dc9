"""What a non-editable install ships: the wheel built from this checkout holds every module of the package and of
the bundled plugins (a subpackage left out of pyproject's list installs without error and fails at import)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_module(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so that no build/ folder left by an earlier build is reused
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("kdbench", "plugins", "experiments"):
        shutil.copytree(REPOSITORY / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("kdbench-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {str(path.relative_to(REPOSITORY)) for path in (REPOSITORY / "kdbench").rglob("*.py")}
    wanted |= {"kdbench_plugins/" + str(path.relative_to(REPOSITORY / "plugins"))
               for path in (REPOSITORY / "plugins").rglob("*.py")}
    wanted = {name for name in wanted if "__pycache__" not in name}
    assert wanted - shipped == set()
    assert "kdbench/experiments/tiny.yaml" in shipped  # the embedded default experiment
