"""Budgets with a time (issue 30): the dry run estimates each stage's wall time and the grid's, and `validate` and
`run` refuse a grid whose estimate is beyond ``runtime.max_estimated_days`` unless the experiment or the command
says the budget is intended."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_bad_input import BASE, invoke

from kdbench.cli_options import with_students
from kdbench.config import parse_experiment
from kdbench.grid.graph import StageKind
from kdbench.grid.selection import resolve_selection
from kdbench.grid.session import GridRequest, plan_prepared, prepare
from kdbench.grid.timing import CPU, GPUS, device_speed, duration
from kdbench.registry import load_registries

ABSURD = 10**12  # a few extra zeros in training.max_steps


def experiment_file(tmp_path: Path, max_steps: int = 2, **runtime: Any) -> Path:
    raw = {**BASE, "training": {**BASE["training"], "max_steps": max_steps}}
    if runtime:
        raw["runtime"] = runtime
    path = tmp_path / f"budget-{max_steps}-{len(runtime)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def plan_of(raw: dict[str, Any], tmp_path: Path, gpus_asked: bool = False) -> Any:
    experiment = with_students(parse_experiment(raw, "t"), None)
    registries = load_registries()
    selection = resolve_selection(experiment, registries, None, None, None)
    request = GridRequest(experiment, selection, None, tmp_path / "out", tmp_path / "cache")
    return plan_prepared(prepare(request, registries), 1, gpus_asked)


def test_training_time_grows_with_its_steps_and_the_grid_adds_its_stages(tmp_path: Path) -> None:
    short = plan_of({**BASE, "training": {**BASE["training"], "max_steps": 100}}, tmp_path)
    long = plan_of({**BASE, "training": {**BASE["training"], "max_steps": 1000}}, tmp_path)
    assert [s.node.key for s in short.stages] != [s.node.key for s in long.stages]  # the budget is in the keys
    methods = [s for s in short.training_stages if "/s1/" in s.node.label]  # sft and kd
    assert methods, [s.node.label for s in short.training_stages]
    for stage in methods:
        twin = next(s for s in long.training_stages if s.node.label == stage.node.label)
        assert stage.seconds is not None and twin.seconds is not None
        # Ten times the steps: ten times the per-step cost, the validation checks included.
        assert 9.0 < twin.seconds / stage.seconds <= 10.5
    assert short.seconds == pytest.approx(sum(s.seconds or 0.0 for s in short.stages))
    evals = [s for s in short.stages if s.node.kind is StageKind.EVAL]
    assert evals and all(s.seconds and s.seconds > 0 for s in evals)


def test_stages_already_built_count_no_time(tmp_path: Path) -> None:
    plan = plan_of(BASE, tmp_path)
    keys = {s.node.key for s in plan.stages}
    # Published entries of every stage but the evaluations: only the cells' evaluations are left to run.
    for stage in plan.stages:
        if stage.node.kind is not StageKind.EVAL:
            entry = tmp_path / "cache" / stage.node.kind.value / stage.node.key
            entry.mkdir(parents=True)
            (entry / "inputs.json").write_text("{}")
    again = plan_of(BASE, tmp_path)
    assert {s.node.key for s in again.stages} == keys
    assert again.seconds == pytest.approx(sum(s.seconds or 0.0 for s in again.stages
                                              if s.node.kind is StageKind.EVAL))
    assert all(s.cached for s in again.stages if s.node.kind is not StageKind.EVAL)


def test_the_device_is_this_machines_gpu_else_the_gpus_asked_for_else_the_cpu() -> None:
    assert device_speed("NVIDIA H100 80GB HBM3", False, False) is GPUS["h100"]
    assert device_speed("NVIDIA A100-SXM4-40GB", False, False) is GPUS["a100"]
    unknown = device_speed("Some Accelerator X", False, False)
    assert unknown.flops == GPUS["a100"].flops and "unknown GPU" in unknown.source
    assert device_speed(None, True, False).flops == GPUS["h100"].flops  # --gpus on a machine without one
    assert device_speed(None, False, True).flops == GPUS["h100"].flops  # paper scale trains on no CPU
    assert device_speed(None, False, False) is CPU


@pytest.mark.parametrize(("seconds", "text"), [(40, "40 s"), (720, "12 min"), (3.5 * 3600, "3.5 h"),
                                               (12 * 86400, "12 days"), (None, "?")])
def test_durations_read_as_a_person_says_them(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


def test_the_dry_run_prints_each_stage_time_and_the_grids(tmp_path: Path) -> None:
    path = experiment_file(tmp_path)
    code, output = invoke("run", "--experiment", str(path), "--dry-run", "--out", str(tmp_path / "out"),
                          "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, output
    assert "Estimated time" in output and "time*" in output
    code, output = invoke("run", "--experiment", str(path), "--dry-run", "--format", "json", "--out",
                          str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"))
    plan = json.loads(output)
    assert plan["estimate"]["device"] == "cpu"
    assert plan["estimate"]["seconds"] == pytest.approx(sum(s["estimated_seconds"] for s in plan["stages"]))


def test_validate_refuses_an_absurd_budget_and_accepts_it_when_intended(tmp_path: Path) -> None:
    code, output = invoke("validate", str(experiment_file(tmp_path, ABSURD)))
    assert code == 2
    assert "runtime.max_estimated_days = 30" in output and "days" in output
    assert "--allow-long-budget" in output and "train" in output  # the longest stage is a training one
    code, output = invoke("validate", str(experiment_file(tmp_path, ABSURD, max_estimated_days=1e15)))
    assert code == 0, output
    code, output = invoke("validate", str(experiment_file(tmp_path, ABSURD)), "--allow-long-budget")
    assert code == 0 and "days" in output, output
    code, output = invoke("validate", str(experiment_file(tmp_path)))
    assert code == 0 and "estimated" in output


def test_run_refuses_an_absurd_budget_before_any_stage(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    code, output = invoke("run", "--experiment", str(experiment_file(tmp_path, ABSURD)), "--out", str(out),
                          "--cache-dir", str(cache))
    assert code == 2 and "runtime.max_estimated_days" in output
    assert not any(cache.rglob("inputs.json")) and not any(out.rglob("result.json"))  # nothing was built
    # The dry run of the same grid shows it and says a run would refuse, without refusing itself.
    code, output = invoke("run", "--experiment", str(experiment_file(tmp_path, ABSURD)), "--dry-run", "--out",
                          str(out), "--cache-dir", str(cache))
    assert code == 0 and "a run would refuse" in output


def test_the_plan_bounds_what_each_stage_writes(tmp_path: Path) -> None:
    plan = plan_of(BASE, tmp_path)
    for stage in plan.training_stages:
        assert stage.training is not None and stage.training.params and stage.disk is not None
        # fp32 weights kept; a resume checkpoint of weights and both Adam moments while it runs
        assert (stage.disk.kept, stage.disk.transient) == (4 * stage.training.params, 12 * stage.training.params)
    cache_stages = [s for s in plan.stages if s.node.kind is not StageKind.EVAL]
    largest = max(s.disk.transient for s in cache_stages if s.disk is not None)
    assert plan.disk_bytes(cells=False) == sum(s.disk.kept for s in cache_stages if s.disk is not None) + largest
    evals = [s for s in plan.stages if s.node.kind is StageKind.EVAL]
    assert plan.disk_bytes(cells=True) == sum(s.disk.kept for s in evals if s.disk is not None) > 0
