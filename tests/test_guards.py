"""Guards against silent wrongness: a uniform or broken teacher stops the stages that read it, with the reason in
the cells' results, while a healthy teacher's probe is recorded and its cells train; a distillation term without
gradient stops its stage on the first step, while a live one's gradient is recorded."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.config import TrainingConfig
from kdbench.data import tokenize_records
from kdbench.objectives import GOLD, LossInputs
from kdbench.registry import load_registries
from kdbench.train.engine import TrainingData, train
from kdbench.train.guards import (
    DEAD_GRADIENT_RMS,
    UNIFORM_NLL_RATIO,
    BrokenTeacher,
    DeadObjective,
    check_teacher,
    probe_batch,
    probe_teacher,
)
from kdbench.zoo import build_tiny_model, load_model, load_tokenizer
from kdbench_plugins.kd import KD, KDParams

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "experiments" / "teachers"  # the tiny suite's trained teachers


def zeroed_copy(source: Path, target: Path) -> Path:
    """``source`` with every weight set to zero: every logit is 0, so the next-token distribution is exactly uniform."""
    model = load_model(str(source))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    model.save_pretrained(target)
    load_tokenizer(str(source)).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def probe_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shipped GPT-2 teacher, its zeroed copy, a random initialisation of its architecture, and a probe batch."""
    root = tmp_path_factory.mktemp("guards")
    tokenizer = load_tokenizer(str(SHIPPED / "gpt2"))
    splits = load_registries().datasets.get("tiny").load({"n_train": 40, "n_validation": 16, "n_test": 4})
    family = load_registries().families.get("gpt2")
    build_tiny_model(family, family.tiny_teacher, tokenizer, 120, 0, root / "random")
    return {"tokenizer": tokenizer, "zeroed": zeroed_copy(SHIPPED / "gpt2", root / "zeroed"), "random": root / "random",
            "probe": probe_batch(tokenize_records(splits["validation"], tokenizer, 120, 72), [])}  # every prompt fits


def probe(setup: dict, folder: Path) -> object:
    return probe_teacher(load_model(str(folder)).eval(), setup["probe"], setup["tokenizer"].pad_token_id)


def test_a_trained_teacher_passes(probe_setup: dict) -> None:
    result = probe(probe_setup, SHIPPED / "gpt2")
    assert result.problem() is None
    assert result.nll < 0.5 * result.uniform and result.tokens > 0 and result.sequences == 16
    check_teacher(result, "gpt2/teacher", "a stage")  # does not raise


def test_a_zeroed_teacher_is_uniform(probe_setup: dict) -> None:
    result = probe(probe_setup, probe_setup["zeroed"])
    assert math.isclose(result.entropy, result.uniform, rel_tol=1e-6)
    with pytest.raises(BrokenTeacher, match="uniform: mean entropy"):
        check_teacher(result, "gpt2/teacher", "gpt2/s1/kd/seed0: train")


def test_an_untrained_teacher_predicts_no_better_than_uniform(probe_setup: dict) -> None:
    """A random initialisation is not exactly uniform, but its gold NLL is that of a uniform guess."""
    result = probe(probe_setup, probe_setup["random"])
    assert result.nll >= UNIFORM_NLL_RATIO * result.uniform
    assert "no better than a uniform guess" in str(result.problem())


def test_a_teacher_with_non_finite_weights_is_broken(probe_setup: dict) -> None:
    model = load_model(str(SHIPPED / "gpt2")).eval()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    result = probe_teacher(model, probe_setup["probe"], probe_setup["tokenizer"].pad_token_id)
    assert "not finite" in str(result.problem())


def test_a_run_fails_the_cells_of_a_uniform_teacher_and_trains_the_healthy_one(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One real tiny run: gpt2's teacher zeroed, opt's the shipped one. gpt2's kd cell is reported failed in its
    training stage with the reason; opt's kd cell is scored and its stage recorded the probe; exit code 1."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "cache"))
    experiment = {
        "name": "guards", "protocol": "uniform",
        "data": {"dataset": "tiny", "options": {"n_train": 64, "n_validation": 8, "n_test": 4, "list_towns": [3, 5]},
                 "max_length": 64, "max_prompt_length": 48},
        "models": {"scale": "tiny", "families": ["gpt2", "opt"],
                   "teachers": {"gpt2": str(zeroed_copy(SHIPPED / "gpt2", tmp_path / "zeroed")),
                                "opt": str(SHIPPED / "opt")}},
        "teacher": {"train": False},
        "init": {"start": "base"},
        "training": {"engine": "accelerate", "lr": 5.0e-3, "batch_size": 8, "max_steps": 2, "warmup_steps": 0,
                     "threads": 1},
        "selection": {"metric": "loss", "every": 2},
        "methods": {"kd": {}},
        "evaluation": {"seeds": [10], "max_new_tokens": 4, "batch_size": 4},
    }
    (tmp_path / "guards.yaml").write_text(yaml.safe_dump(experiment))
    result = CliRunner().invoke(app, ["run", "-e", "guards.yaml", "--out", "out"])
    assert result.exit_code == 1, (result.output, result.exception)
    cells = tmp_path / "out" / "cells"
    failed = json.loads((cells / "gpt2" / "s1" / "kd" / "seed0" / "result.json").read_text())
    assert failed["status"] == "failed" and failed["failure"]["stage"] == "gpt2/s1/kd/seed0: train"
    reason = failed["failure"]["reason"]
    assert reason.startswith("BrokenTeacher: teacher gpt2/teacher is unusable") and "uniform" in reason
    healthy = json.loads((cells / "opt" / "s1" / "kd" / "seed0" / "result.json").read_text())
    assert healthy["status"] == "ok"
    stats = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "train").glob("*/train_stats.json")]
    assert len(stats) == 1 and stats[0]["teacher_probe"]["nll"] < 0.5 * stats[0]["teacher_probe"]["uniform"]
    teacher_row = json.loads((cells / "gpt2" / "teacher" / "teacher" / "seed0" / "result.json").read_text())
    assert teacher_row["status"] == "ok"  # evaluating a bad teacher is allowed: its row shows how bad it is


class DetachedKD(KD):
    """A bug an objective can have: the student's logits detached, so the loss runs and falls to nothing."""

    name = "detached_kd"

    @staticmethod
    def loss(inputs: LossInputs, params: KDParams) -> torch.Tensor:
        view = inputs[GOLD]
        return KD.loss({GOLD: dataclasses.replace(view, student_logits=view.student_logits.detach())}, params)


def first_step(setup: dict, student: Path, objective: type[KD] = KD, **params: object) -> float | None:
    """One kd-style optimizer step (two micro-batches) of ``student`` from the shipped GPT-2 teacher on the probe
    batch; the distillation term's first-step gradient it recorded."""
    settings = TrainingConfig(engine="accelerate", lr=1e-3, batch_size=4, grad_accum=2, max_steps=1, warmup_steps=0)
    data = TrainingData(setup["probe"], setup["tokenizer"].pad_token_id, setup["tokenizer"].eos_token_id)
    _, stats = train(load_model(str(student)), objective, objective.make_params(params), data, settings, seed=0,
                     teacher=load_model(str(SHIPPED / "gpt2")).eval(), stage="test: train")
    return stats.first_gradient_rms


def test_a_live_distillation_term_has_its_first_gradient_recorded(probe_setup: dict) -> None:
    assert first_step(probe_setup, probe_setup["random"]) > 1e3 * DEAD_GRADIENT_RMS
    assert first_step(probe_setup, probe_setup["random"], kd_ratio=0.0) is None  # no distillation term: no check


@pytest.mark.parametrize(("objective", "student"), [(DetachedKD, "random"), (KD, "teacher copy")])
def test_a_distillation_term_without_gradient_stops_the_stage(probe_setup: dict, objective: type[KD],
                                                                student: str) -> None:
    """A detached student (exactly zero) and a student that is the teacher's copy (rounding only) both fail."""
    folder = SHIPPED / "gpt2" if student == "teacher copy" else probe_setup["random"]
    with pytest.raises(DeadObjective, match=f"{objective.name}'s distillation term .* first optimizer step of test"):
        first_step(probe_setup, folder, objective)


class DeclaredVanishing(DetachedKD):
    """An objective that says why its gradient may be 0 at a healthy start (as dpkd-token does)."""

    name = "declared_vanishing"
    gradient_can_vanish = "a reason the objective documents"


def test_an_objective_that_says_why_its_gradient_may_vanish_is_warned_about_not_stopped(
        probe_setup: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="kdbench.train.guards"):
        assert first_step(probe_setup, probe_setup["random"], DeclaredVanishing) == 0.0
    assert "declared_vanishing says why it may be: a reason the objective documents" in caplog.text
