"""What the terminal shows: messages that quote the user's input show it as given, and help text wraps to the
terminal's width. Each test runs the real command line (``python -m kdbench``), as a user's shell does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the real command line, one process per case


def kdbench(*args: str, cwd: Path, columns: int = 80) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdbench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "COLUMNS": str(columns), "HF_HUB_OFFLINE": "1",
                                            "HF_DATASETS_OFFLINE": "1", "TERM": "dumb"})


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(("name", "exists"), [("[/x]", False), ("[red]experiment.yaml", True), ("root:x:0.yaml", True)])
def test_a_path_in_a_message_is_shown_as_given(name: str, exists: bool, tmp_path: Path) -> None:
    """Rich markup (``[/x]`` once raised a MarkupError traceback; ``[red]`` vanished) and emoji codes (``:x:``
    became ❌) in a quoted path are printed literally."""
    if exists:
        (tmp_path / name).write_text("name: [unclosed\n")
    for args in (["run", "-e", name], ["validate", name]):
        shown = kdbench(*args, cwd=tmp_path, columns=400)
        assert shown.returncode == 2 and "Traceback" not in shown.stderr, shown.stderr
        assert name in shown.stderr, shown.stderr


def test_file_contents_quoted_in_a_message_keep_their_colons(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    shown = kdbench("run", "-e", "passwd", cwd=tmp_path, columns=400)
    assert shown.returncode == 2 and "root:x:0:0" in shown.stderr and "❌" not in shown.stderr, shown.stderr


def test_command_help_wraps_to_the_terminal_width(tmp_path: Path) -> None:
    """A docstring's paragraph is one paragraph of help: its source line breaks do not survive in the output, so it
    fills a wide terminal and stays within a narrow one."""
    wide = kdbench("run", "--help", cwd=tmp_path, columns=200).stdout.splitlines()
    start = next(line for line in wide if "The grid is collected" in line)
    assert "then run: finished cells and cached" in start  # the source breaks the line before "then run"
    narrow = kdbench("report", "--help", cwd=tmp_path, columns=60).stdout.splitlines()
    assert narrow and all(len(line) <= 60 for line in narrow)
    words = one_line("\n".join(narrow))
    assert "(each seed's score the mean over its evaluation seeds)" in words
    lengths = [len(line.strip()) for line in narrow if line.strip() and not line.startswith(("╭", "│", "╰"))]
    short = [n for n in lengths[:-1] if n < 30]  # a source line break leaves a short line mid-paragraph
    assert len(short) <= 3, narrow
