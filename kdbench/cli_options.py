"""What the ``kdbench`` commands share: the consoles, the common options and how they are read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from kdbench.errors import KdbenchError

if TYPE_CHECKING:
    from kdbench.config import Experiment

# Messages quote the user's input (paths, names, file contents): no emoji codes (`:x:`), and markup only where
# kdbench writes it, the quoted parts escaped.
stdout = Console(emoji=False)
stderr = Console(stderr=True, emoji=False)

PluginsDir = Annotated[Optional[Path], typer.Option("--plugins-dir", help="Folder of extra .py plugin files.")]


def split_names(value: str | None, option: str = "--methods") -> list[str] | None:
    """The names of a comma-separated option; None when it was not given. Given but naming nothing (``--methods ""``)
    is a mistake: running the experiment's whole grid instead would surprise."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        example = "gpt2,opt" if option == "--models" else "sft,kd"
        raise KdbenchError(f"{option} {value!r} names nothing; expected a comma-separated list such as {example}. "
                           f"Leave {option} out to use the experiment's.")
    return names


MethodsOption = Annotated[Optional[str], typer.Option(
    help="Comma-separated objectives, e.g. sft,kd (default: the experiment's).")]
ModelsOption = Annotated[Optional[str], typer.Option(
    help="Comma-separated model families, e.g. gpt2,opt (default: the experiment's).")]
ExperimentOption = Annotated[Optional[Path], typer.Option(
    "--experiment", "-e", help="Experiment YAML (default: embedded experiments/tiny.yaml).")]
SeedsOption = Annotated[Optional[int], typer.Option(
    min=1, help="Number of training seeds per cell (0..N-1; default: the experiment's).")]
StudentsOption = Annotated[Optional[str], typer.Option(
    help="Comma-separated student labels, e.g. s1,s2 (default: the experiment's models.students, else every "
    "paper-scale student or the first tiny one).")]
CacheOption = Annotated[Optional[Path], typer.Option(
    help="Stage cache (default: $KDBENCH_CACHE_DIR or ~/.cache/kdbench).")]


def with_students(config: Experiment, students: Optional[str]) -> Experiment:
    """``config`` with ``--students`` as its ``models.students`` when given."""
    if students is None:
        return config
    return config.model_copy(update={"models": config.models.model_copy(update={
        "students": split_names(students, "--students")})})
