"""The one StepPlan of a training stage: what each built-in objective's step reads and needs, and that the grid
wires a stage's dependencies from it (the teacher, its stored generations, its stored outputs)."""

from __future__ import annotations

from typing import Any

import pytest

from kdbench.config import TrainingConfig, load_experiment
from kdbench.grid.collect import collect
from kdbench.grid.graph import StageKind
from kdbench.grid.selection import resolve_selection
from kdbench.grid.specs import TrainSpec
from kdbench.objectives import GOLD
from kdbench.registry import load_registries
from kdbench.train.step import StepPlan, plan_step

SETTINGS = TrainingConfig(max_steps=1)


def plan(method: str, settings: TrainingConfig = SETTINGS, **params: Any) -> StepPlan:
    registries = load_registries()
    objective = registries.objectives.get(method)
    return plan_step(objective, objective.make_params(params), registries.sources, settings)


@pytest.mark.parametrize(("method", "params", "reads", "logits", "on_gold", "samples", "texts", "student"), [
    ("sft", {}, (GOLD,), False, False, False, False, False),
    ("kd", {}, (GOLD,), True, True, False, False, False),
    ("kd", {"kd_ratio": 0.0}, (GOLD,), False, False, False, False, False),  # the CE term alone
    ("kd", {"train_on": "teacher_text"}, ("teacher_text",), True, False, False, True, False),
    ("seqkd", {}, (GOLD, "teacher_text"), False, False, False, True, False),
    ("gkd", {}, (GOLD, "on_policy"), True, False, False, False, True),
    ("dpkd", {}, (GOLD, "teacher_text", "student_samples"), True, False, False, True, True),
    ("minillm", {}, (GOLD, "rollouts"), True, False, True, False, True),
])
def test_what_each_step_reads_and_needs(method: str, params: dict[str, Any], reads: tuple[str, ...], logits: bool,
                                        on_gold: bool, samples: bool, texts: bool, student: bool) -> None:
    step = plan(method, **params)
    assert step.reads == reads
    assert (step.teacher_logits, step.logits_on_gold, step.teacher_samples) == (logits, on_gold, samples)
    assert (step.teacher_generations, step.samples_student) == (texts, student)
    assert step.roles[0] == GOLD and step.source_of(GOLD) == params.get("train_on", GOLD)


def test_the_teacher_is_loaded_only_for_what_needs_it() -> None:
    assert not plan("sft").uses_teacher(stored_logits=False)
    assert plan("kd").uses_teacher(stored_logits=False) and not plan("kd").uses_teacher(stored_logits=True)
    assert plan("minillm").uses_teacher(stored_logits=True)  # its rollouts sample from the teacher
    lm_kd = TrainingConfig(max_steps=1, lm_coef=0.5, lm_kd_ratio=0.5)
    assert plan("sft", lm_kd).lm_distils and plan("sft", lm_kd).uses_teacher(stored_logits=False)
    assert not plan("sft", TrainingConfig(max_steps=1, lm_coef=0.5, lm_kd_ratio=0.0)).lm_distils


def test_the_grid_wires_each_stage_from_its_plan() -> None:
    """Every training stage of the tiny suite's grid: its plan is the one plan_step makes from its spec, and its
    dependencies are exactly what that plan asks for."""
    experiment, registries = load_experiment(None), load_registries()
    methods = registries.objectives.names()
    graph = collect(experiment, registries, resolve_selection(experiment, registries, methods, ["gpt2"], 1))
    trained = [node for node in graph if node.kind is StageKind.TRAIN and isinstance(node.spec, TrainSpec)]
    assert len(trained) >= len(methods)
    for node in trained:
        spec: TrainSpec = node.spec
        assert spec.plan == plan_step(spec.objective, spec.params, registries.sources, spec.settings), node.label
        stored = "outputs" in node.deps
        assert stored == (spec.plan.logits_on_gold and experiment.teacher_outputs.share), node.label
        assert ("teacher" in node.deps) == spec.plan.uses_teacher(stored_logits=stored), node.label
        assert ("texts" in node.deps) == spec.plan.teacher_generations, node.label
        assert list(node.inputs["sources"]) == list(spec.plan.reads), node.label
