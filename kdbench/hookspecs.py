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
    from kdbench.contracts import Metric, Objective, SequenceSource
    from kdbench.data import DatasetSpec
    from kdbench.zoo import ModelFamily

PROJECT = "kdbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kdbench_register_objectives() -> list[type[Objective]]:
    """Return objective classes (subclasses of ``kdbench.Objective``).

    Each class names itself (``name``) with a ``version`` (bump it when the loss changes: the cells it
    trained get new keys and re-run), declares what the runner must provide (``needs``), which
    sequence sources its loss reads (``reads``, names registered through
    ``kdbench_register_sequence_sources``), whether the loss is per token or per sequence
    (``reduction``), its parameters (``Params``, a dataclass with defaults), what its loss does where the
    student equals the teacher (``at_teacher``, which ``kdbench.testing.objective_contract`` checks) and a
    pure ``loss`` over one ``SequenceView`` per source read. All results are collected; a name registered
    twice is an error naming both plugins.
    """


@hookspec
def kdbench_register_sequence_sources() -> list[type[SequenceSource]]:
    """Return sequence-source classes (subclasses of ``kdbench.SequenceSource``).

    A source makes one kind of sequence for a micro-batch of training prompts (``sequences``): gold
    responses, stored teacher text, fresh student samples, rollouts. It names itself with a
    ``version`` (part of the key of every training stage that reads it), declares what it needs
    (``needs``), whether it samples the student, whether it chooses the prompts of a step
    (``drives_prompts``, at most one per objective) and its ``Options``. All results are collected;
    names must be unique.
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
    """Return ``kdbench.Metric`` objects: name, ``higher_is_better`` and a per-example
    score ``fn(prediction, references) -> float`` in [0, 1]. All results are collected."""


@hookspec
def kdbench_on_run_start(plan: dict[str, Any]) -> None:
    """Called once before any stage runs. ``plan`` holds ``experiment``, ``out_dir``, ``cells`` (the
    labels of every cell, ``family/student/method/seed<k>``, the teachers' rows included), ``to_run``
    (those not finished by an earlier run) and ``stages`` (the number of stages in the graph).
    Observers only: the return value is ignored."""


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
    """A cell's result (the ``result.json`` content, ``kdbench.results.schema.CellResult``) was written:
    scored (``status: ok``) or not (``failed``, ``diverged``, with its ``failure``)."""


@hookspec
def kdbench_on_run_end(out_dir: str, seconds: float) -> None:
    """The whole grid finished; results are in ``out_dir``."""
