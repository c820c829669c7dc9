"""A cell's ``result.json`` record, assembled from plain values: who the cell is and what built it
(``CellIdentity``), its status, and for a scored cell what its evaluation and training measured. The grid's
builders gather those values; the record's layout is decided here, beside its schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kdbench.results import store
from kdbench.results.schema import (
    SCHEMA_VERSION,
    CellResult,
    CodeVersions,
    ControlRecord,
    Cost,
    Failure,
    StageCost,
    Status,
)


@dataclass(frozen=True)
class CellIdentity:
    """What names a cell and its provenance: the same for every record the cell ever gets, scored or not."""

    experiment: str
    key: str
    lineage: list[str]
    versions: CodeVersions
    config_hash: str
    shared_config_hash: str
    family: str
    student: str
    method: str
    kind: Literal["teacher", "student"]
    train_seed: int
    primary_metric: str
    protocol: str
    protocol_card: dict[str, str]
    controls: list[ControlRecord]  # the report reads controls from result files alone
    processes: int


def stage_cost(stats: dict[str, Any]) -> StageCost:
    """A training stage's cost from its recorded stats (zero for a stage with none: a shipped or untrained model)."""
    return {"optimizer_steps": int(stats.get("steps", 0)), "examples": int(stats.get("examples", 0)),
            "tokens": int(stats.get("tokens", 0)), "seconds": float(stats.get("seconds", 0.0))}


def new_result(cell: CellIdentity, status: Status, failure: Failure | None = None) -> CellResult:
    """The fields every result has, scored or not; ``scored`` fills in a scored cell's measurements."""
    result: CellResult = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "experiment": cell.experiment,
        "key": cell.key,
        "lineage": cell.lineage,
        "versions": cell.versions,
        "config_hash": cell.config_hash,
        "shared_config_hash": cell.shared_config_hash,
        "family": cell.family, "student": cell.student, "method": cell.method,
        "kind": cell.kind,
        "train_seed": cell.train_seed,
        "primary_metric": cell.primary_metric,
        "metrics": {}, "higher_is_better": {}, "per_task": {},
        "eval_examples": 0, "eval_examples_by_dataset": {},
        "wall_seconds": {"train": 0.0, "eval": 0.0, "total": 0.0, "this_run": 0.0},
        "protocol": cell.protocol,
        "protocol_card": cell.protocol_card,
        "tokens": {"train": 0, "response": 0},
        "optimizer_steps": 0,
        "optimizer_steps_total": 0,
        "cost": {"own": stage_cost({}), "ancestors": {}, "total": stage_cost({})},
        "selected_step": 0,
        "validation": {"metric": None, "curve": []},
        "processes": cell.processes,
        "forward_passes": {"student": 0, "teacher": 0},
        "params": {},
        "peak_memory_mb": store.peak_memory_mb(),
        "finished_at": store.now_iso(),
        "controls": cell.controls,
    }
    if failure is not None:
        result["failure"] = failure
    return result


def scored(cell: CellIdentity, *, metrics: dict[str, dict[str, float]], higher_is_better: dict[str, bool],
           per_task: dict[str, Any], eval_examples: dict[str, int], eval_seconds: float, this_run_seconds: float,
           train_stats: dict[str, Any], cost: Cost, params: dict[str, int | None]) -> CellResult:
    """A scored cell's record. ``eval_examples`` is by evaluation set ("" for the main one); ``train_stats`` are
    the stats of the stage that made the cell's model (none for an untrained teacher); ``this_run_seconds`` is
    the evaluation's wall time in this run, to which the training's own time in this run is added."""
    train_seconds = float(train_stats.get("seconds", 0.0))
    result = new_result(cell, "ok")
    result.update(
        metrics=metrics,
        higher_is_better=higher_is_better,
        per_task=per_task,
        eval_examples=eval_examples[""],
        eval_examples_by_dataset=eval_examples,
        wall_seconds={"train": train_seconds, "eval": eval_seconds, "total": train_seconds + eval_seconds,
                      "this_run": this_run_seconds + train_stats.get("this_run", 0.0)},
        tokens={"train": train_stats.get("tokens", 0), "response": train_stats.get("response_tokens", 0)},
        optimizer_steps=cost["own"]["optimizer_steps"],
        optimizer_steps_total=cost["total"]["optimizer_steps"],
        cost=cost,
        selected_step=int(train_stats.get("selected_step", train_stats.get("steps", 0))),
        validation={"metric": train_stats.get("selection", {}).get("metric"),
                    "curve": train_stats.get("validation", [])},
        forward_passes={"student": train_stats.get("student_forwards", 0),
                        "teacher": train_stats.get("teacher_forwards", 0)},
        params={role: count for role, count in params.items() if count is not None},
    )
    return result
