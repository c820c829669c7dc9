"""The hooks a kdbench plugin may implement. Each docstring is the hook's contract.

A plugin is any module or object with functions marked ``@kdbench.hookimpl``. kdbench finds its
built-ins and third-party packages through the ``kdbench.plugins`` entry-point group, then the
``.py`` files of ``--plugins-dir``. ``register_*`` hooks return lists; every result is collected
and names must be unique across all plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from kdbench.data import DatasetSpec
    from kdbench.evaluation import Metric
    from kdbench.objectives import Objective
    from kdbench.zoo import ModelFamily

PROJECT = "kdbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kdbench_register_objectives() -> list[type[Objective]]:
    """Return objective classes (subclasses of ``kdbench.objectives.Objective``).

    Each class names itself (``name``), declares what the runner must provide (``needs``), which
    sequences its loss reads (``sequence``: gold, teacher text, a preference pair or its own
    rollouts), its parameters (``Params``, a dataclass with defaults) and a pure loss: per token
    (``token_loss``), per pair (``pair_loss``) or per rollout token (``rollout_loss``). All results
    are collected; a name registered twice is an error naming both plugins.
    """


@hookspec
def kdbench_register_model_families() -> list[ModelFamily]:
    """Return ``kdbench.zoo.ModelFamily`` objects: name → tiny architectures and paper checkpoints.

    All results are collected; names must be unique.
    """


@hookspec
def kdbench_register_datasets() -> list[DatasetSpec]:
    """Return ``kdbench.data.DatasetSpec`` objects: name → loader of train/validation/test records
    in Dolly's schema. All results are collected; names must be unique."""


@hookspec
def kdbench_register_metrics() -> list[Metric]:
    """Return ``kdbench.evaluation.Metric`` objects: name, ``higher_is_better`` and a per-example
    score ``fn(prediction, references) -> float`` in [0, 1]. All results are collected."""


@hookspec
def kdbench_on_run_start(plan: dict[str, Any]) -> None:
    """Called once before any stage runs. ``plan`` holds ``experiment``, ``out_dir`` and ``cells``
    (a list of cell labels). Observers only: the return value is ignored."""


@hookspec
def kdbench_on_stage_start(stage: str, total: int | None) -> None:
    """A long stage begins (``"teacher gpt2: train"``, ``"gpt2/s1/kd: eval"``). ``total`` is the
    number of steps it will report through ``kdbench_on_step_end``, or None if unknown."""


@hookspec
def kdbench_on_step_end(stage: str, step: int, metrics: dict[str, float]) -> None:
    """One step of ``stage`` finished (an optimizer step, or one generation batch); ``metrics``
    holds what the step measured (``loss``, ``lr``, …), possibly nothing."""


@hookspec
def kdbench_on_stage_end(stage: str, seconds: float, cached: bool) -> None:
    """``stage`` finished after ``seconds``; ``cached`` is True when its output was reused."""


@hookspec
def kdbench_on_cell_end(cell: str, result: dict[str, Any]) -> None:
    """A cell's result (the ``result.json`` content) was written."""


@hookspec
def kdbench_on_run_end(out_dir: str, seconds: float) -> None:
    """The whole grid finished; results are in ``out_dir``."""
