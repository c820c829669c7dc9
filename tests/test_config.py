"""Experiment files: schema, semantic checks against the registries, config hashes, and `kdbench validate`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.config import Experiment, config_hash, load_experiment, parse_experiment
from kdbench.errors import KdbenchError
from kdbench.grid.selection import semantic_errors
from kdbench.registry import Registries, load_registries

REPO = Path(__file__).resolve().parents[1]
KDBENCH = Path(sys.executable).parent / "kdbench"  # the console script of the running environment
MANY_MISTAKES = {
    "name": "bad",
    "protocol": "uniform",
    "colour": "blue",  # unknown top-level key
    "training": {"lr": -1, "zero_stage": 7, "epochs": 1},
    "evaluation": {"seeds": []},
}
MISTAKE_PATHS = ("training.lr", "training.zero_stage", "colour", "evaluation.seeds")


@pytest.fixture(scope="module")
def registries() -> Registries:
    """The built-in registries (entry points only)."""
    return load_registries()


def _minimal(**overrides: Any) -> dict[str, Any]:
    """The smallest valid experiment mapping, with top-level overrides."""
    raw: dict[str, Any] = {"name": "t", "protocol": "uniform", "training": {"epochs": 1}}
    raw.update(overrides)
    return raw


def _write(path: Path, raw: dict[str, Any]) -> Path:
    """Dump ``raw`` as YAML to ``path``."""
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _error_lines(raw: dict[str, Any]) -> list[str]:
    """The lines of the KdbenchError that parsing ``raw`` raises."""
    with pytest.raises(KdbenchError) as info:
        parse_experiment(raw, "test.yaml")
    return str(info.value).splitlines()


# -- schema -------------------------------------------------------------------------------------

def test_embedded_default_loads_and_matches_repo_file() -> None:
    """load_experiment(None) is the packaged experiments/tiny.yaml."""
    default = load_experiment(None)
    assert isinstance(default, Experiment)
    assert default.name == "tiny"
    assert default == load_experiment(REPO / "experiments" / "tiny.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_repo_experiment_validates(path: Path, registries: Registries) -> None:
    """Schema and semantic checks pass for every shipped experiment file."""
    experiment = load_experiment(path)
    assert semantic_errors(experiment, registries) == []


def test_repo_has_experiment_files() -> None:
    """The parametrised test above is not vacuous: the tiny suite and the six paper pairs."""
    names = {p.stem for p in (REPO / "experiments").glob("*.yaml")}
    assert names >= {"tiny", "gpt2-120m_from_gpt2-1.5b", "gpt2-340m_from_gpt2-1.5b", "gpt2-760m_from_gpt2-1.5b",
                     "opt-1.3b_from_opt-13b", "opt-2.7b_from_opt-13b", "opt-6.7b_from_opt-13b"}


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*_from_*.yaml")), ids=lambda p: p.name)
def test_paper_experiments_follow_the_papers(path: Path) -> None:
    """Each paper file starts with the command that runs it and uses the papers' engine settings."""
    first_lines = path.read_text(encoding="utf-8").splitlines()[:3]
    assert f"kdbench run --experiment experiments/{path.name}" in first_lines[1]
    experiment = load_experiment(path)
    assert experiment.name == path.stem and experiment.models.scale == "paper"
    assert (experiment.training.engine, experiment.training.zero_stage, experiment.training.precision) == (
        "deepspeed", 1, "bf16")
    assert (experiment.data.max_length, experiment.data.max_prompt_length) == (512, 256)
    assert set(experiment.methods) == {"sft", "kd", "seqkd", "minillm", "dpkd", "dpkd-token"}
    assert experiment.training_for("minillm").lr == 5e-6 and experiment.training_for("kd") == experiment.training
    assert set(experiment.evaluation.datasets) == {"selfinst", "vicuna", "sinst", "uinst"}
    assert experiment.evaluation.seeds == [10, 20, 30, 40, 50]


def test_method_training_overrides_only_that_method() -> None:
    """A method's own training fields replace the shared ones for it alone, re-validated as a whole."""
    experiment = parse_experiment(_minimal(protocol="paper", methods={"sft": {}, "minillm": {}},
                                           method_training={"minillm": {"lr": 5e-6, "epochs": None, "max_steps": 7}}), "t")
    assert experiment.training_for("minillm").lr == 5e-6 and experiment.training_for("minillm").max_steps == 7
    assert experiment.training_for("sft") == experiment.training
    lines = _error_lines(_minimal(protocol="paper", method_training={"kd": {"lrr": 1.0}, "sft": {"epochs": None}}))
    assert any("method_training.kd" in line and "lrr" in line for line in lines)
    assert any("method_training.sft" in line and "give epochs or max_steps" in line for line in lines)


def test_uniform_protocol_refuses_a_method_its_own_budget() -> None:
    """Under uniform no method trains more than another: a per-method budget field is an error naming it, while
    a learning rate of its own is allowed; the protocol itself must be named."""
    lines = _error_lines(_minimal(methods={"sft": {}, "minillm": {}},
                                  method_training={"minillm": {"lr": 5e-6, "epochs": None, "max_steps": 7}}))
    assert any("method_training.minillm" in line and "protocol uniform" in line and "max_steps" in line
               for line in lines)
    assert parse_experiment(_minimal(methods={"minillm": {}}, method_training={"minillm": {"lr": 5e-6}}), "t")
    unnamed = _minimal()
    del unnamed["protocol"]
    assert any(line.strip().startswith("protocol: Field required") for line in _error_lines(unnamed))


def test_extra_evaluation_sets_trackers_and_method_training_are_checked(registries: Registries) -> None:
    """Unknown evaluation sets or their options, and overrides of methods not run, are reported together."""
    experiment = parse_experiment(_minimal(
        methods={"kd": {}}, method_training={"dpkd": {"lr": 1e-5}},
        evaluation={"datasets": {"si": {"dataset": "selfinstt"}, "vic": {"dataset": "vicuna", "options": {"pth": "x"}}}},
    ), "t")
    errors = semantic_errors(experiment, registries)
    assert any(e.startswith("evaluation.datasets.si.dataset:") and "selfinst" in e for e in errors)
    assert any(e.startswith("evaluation.datasets.vic.options.pth:") for e in errors)
    assert any(e.startswith("method_training.dpkd:") for e in errors)
    assert semantic_errors(parse_experiment(_minimal(trackers=["tensorboard"]), "t"), registries) == []


def test_every_schema_mistake_is_reported_at_once_one_line_each() -> None:
    """lr, zero_stage, an unknown key and an empty seed list all appear, each on its own line."""
    lines = _error_lines(MANY_MISTAKES)
    assert "4 error(s)" in lines[0]
    for path in MISTAKE_PATHS:
        matching = [line for line in lines if line.strip().startswith(f"{path}:")]
        assert len(matching) == 1, (path, lines)


def test_missing_required_field_is_named() -> None:
    """An experiment without `training` or `name` says which fields are missing."""
    lines = _error_lines({"description": "x"})
    assert any(line.strip().startswith("name:") for line in lines)
    assert any(line.strip().startswith("training:") for line in lines)


def test_non_mapping_yaml_is_a_kdbench_error(tmp_path: Path) -> None:
    """A YAML list or invalid YAML is a KdbenchError, not a crash."""
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(KdbenchError, match="mapping"):
        load_experiment(listing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(KdbenchError, match="not valid YAML"):
        load_experiment(broken)
    with pytest.raises(KdbenchError, match="does not exist"):
        load_experiment(tmp_path / "absent.yaml")


@pytest.mark.parametrize("lengths", [(64, 64), (64, 80)])
def test_prompt_length_must_be_below_max_length(lengths: tuple[int, int]) -> None:
    """max_prompt_length >= max_length is an error on `data`; one below is fine."""
    max_length, max_prompt = lengths
    lines = _error_lines(_minimal(data={"max_length": max_length, "max_prompt_length": max_prompt}))
    assert any(line.strip().startswith("data:") and "max_prompt_length" in line for line in lines)
    ok = parse_experiment(_minimal(data={"max_length": max_length, "max_prompt_length": max_length - 1}), "t")
    assert ok.data.max_prompt_length == max_length - 1


@pytest.mark.parametrize("training", [{}, {"lr": 1e-3}])
def test_a_training_length_is_required(training: dict[str, Any]) -> None:
    """Neither epochs nor max_steps is an error."""
    lines = _error_lines(_minimal(training=training))
    assert any("give epochs or max_steps" in line for line in lines)


def test_with_epochs_and_max_steps_whichever_ends_first_wins() -> None:
    """MiniLLM stops at min(5,000 steps, 10 data epochs)."""
    from kdbench.train.engine import total_optimizer_steps

    both = parse_experiment(_minimal(training={"epochs": 2, "max_steps": 10, "batch_size": 4}), "t").training
    assert total_optimizer_steps(both, 100, 1) == 10 and total_optimizer_steps(both, 12, 1) == 6


def test_epochs_or_max_steps_alone_are_valid() -> None:
    """Either length alone parses; the teacher falls back to the student's training block."""
    by_epochs = parse_experiment(_minimal(training={"epochs": 2}), "t")
    by_steps = parse_experiment(_minimal(training={"max_steps": 5}), "t")
    assert by_epochs.training.epochs == 2 and by_epochs.training.max_steps is None
    assert by_steps.training.max_steps == 5 and by_steps.training.epochs is None
    assert by_steps.teacher_training == by_steps.training


def test_teacher_training_block_is_validated_too() -> None:
    """A teacher training block with neither length is reported under teacher.training."""
    lines = _error_lines(_minimal(teacher={"training": {"lr": 1e-3}}))
    assert any(line.strip().startswith("teacher.training:") for line in lines)


# -- semantic checks -----------------------------------------------------------------------------

def test_unknown_method_suggests_kd(registries: Registries) -> None:
    """methods: {kdd: {}} → an error under methods.kdd suggesting 'kd'."""
    experiment = parse_experiment(_minimal(methods={"kdd": {}}), "t")
    errors = semantic_errors(experiment, registries)
    assert len(errors) == 1
    assert errors[0].startswith("methods.kdd:")
    assert "did you mean 'kd'" in errors[0].lower()


def test_bad_method_parameter_has_its_path(registries: Registries) -> None:
    """A misspelt or out-of-range kd parameter is reported as methods.kd.<field>."""
    experiment = parse_experiment(_minimal(methods={"kd": {"temprature": 2.0}, "sft": {}}), "t")
    errors = semantic_errors(experiment, registries)
    assert len(errors) == 1
    assert "methods.kd.temprature" in errors[0]
    experiment = parse_experiment(_minimal(methods={"kd": {"kd_ratio": 2.0}}), "t")
    (error,) = semantic_errors(experiment, registries)
    assert error.startswith("methods.kd.") and "kd_ratio" in error


def test_unknown_plugin_names_everywhere_are_all_reported(registries: Registries) -> None:
    """Unknown dataset, family, metric and method are reported together, each under its own field."""
    raw = _minimal(data={"dataset": "tinny"}, models={"families": ["gpt3"]}, evaluation={"metrics": ["rouge"]},
                   methods={"kdd": {}})
    errors = semantic_errors(parse_experiment(raw, "t"), registries)
    prefixes = sorted(error.split(":", 1)[0] for error in errors)
    assert prefixes == ["data.dataset", "evaluation.metrics", "methods.kdd", "models.families", "selection.metric"]


def test_unknown_dataset_option_is_a_semantic_error(registries: Registries) -> None:
    """A misspelt data option (seeed) should be reported by validation, not only when the run loads data."""
    experiment = parse_experiment(_minimal(data={"dataset": "tiny", "options": {"seeed": 1}}), "t")
    errors = semantic_errors(experiment, registries)
    assert any(error.startswith("data.options") for error in errors)


# -- positive controls ---------------------------------------------------------------------------

def _control(**fields: str) -> dict[str, str]:
    return {"task": "modes", "better": "rkl", "worse": "kd", "mechanism": "reverse KL is mode-seeking", **fields}


def test_a_control_needs_two_different_methods_and_a_mechanism() -> None:
    lines = _error_lines(_minimal(controls=[_control(worse="rkl"), _control(mechanism="  "),
                                            {"task": "modes", "better": "rkl", "worse": "kd"}]))
    assert "3 error(s)" in lines[0]
    assert any(line.strip().startswith("controls.0: better and worse are both 'rkl'") for line in lines), lines
    assert any(line.strip().startswith("controls.1.mechanism:") and "mechanism" in line for line in lines), lines
    assert any(line.strip().startswith("controls.2.mechanism: Field required") for line in lines), lines
    parsed = parse_experiment(_minimal(controls=[_control(source="MiniLLM")]), "t")
    assert parsed.controls[0].source == "MiniLLM" and parse_experiment(_minimal(), "t").controls == []


def test_controls_name_registered_methods_of_the_experiment_and_tasks_of_its_data(registries: Registries) -> None:
    tasks = list(registries.datasets.get("tiny").tasks({}))  # type: ignore[misc]
    methods = {"rkl": {}, "kd": {}}
    good = parse_experiment(_minimal(methods=methods, controls=[_control(task=tasks[0])]), "t")
    assert semantic_errors(good, registries) == []
    bad = parse_experiment(_minimal(methods=methods, controls=[_control(task="modez", better="rkll", worse="minillm")]),
                           "t")
    errors = semantic_errors(bad, registries)
    assert len(errors) == 3, errors
    better, worse, task = errors
    assert better.startswith("controls[0].better: unknown objective 'rkll'.") and "Did you mean 'rkl'" in better
    assert worse == ("controls[0].worse: 'minillm' is not one of this experiment's methods ['kd', 'rkl']; add it to "
                     "methods or name one of them")
    assert task.startswith(f"controls[0].task: 'modez' is not a task of data.dataset 'tiny' with these options; "
                           f"expected one of {tasks};")
    # A dataset that cannot tell its tasks without loading its records: the task is not checked.
    jsonl = parse_experiment(_minimal(methods=methods, data={"dataset": "jsonl", "options": {"dir": "x"}},
                                      controls=[_control(task="anything")]), "t")
    assert semantic_errors(jsonl, registries) == []


def test_validate_reports_each_bad_control_on_its_own_line_with_exit_code_2(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from kdbench import cli

    bad = _write(tmp_path / "bad.yaml", _minimal(methods={"rkl": {}, "kd": {}}, controls=[
        _control(task="modez"), _control(better="rkll", worse="sft")]))
    errors = io.StringIO()
    monkeypatch.setattr(cli, "stderr", Console(file=errors, width=1000))
    monkeypatch.setattr(sys, "argv", ["kdbench", "validate", str(bad)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    text = errors.getvalue()
    assert "Traceback" not in text and "3 error(s)" in text
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("controls[")]
    assert [line.split(":", 1)[0] for line in lines] == ["controls[0].task", "controls[1].better", "controls[1].worse"]


def test_controls_enter_no_stage_key_cell_config_or_hash(registries: Registries) -> None:
    """Declaring a control re-runs nothing: every key and cell config is the same; the cells' results record it."""
    from types import SimpleNamespace

    from kdbench.config import ControlConfig
    from kdbench.grid.collect import collect
    from kdbench.grid.selection import resolve_selection
    from kdbench.grid.stages import cell_identity
    from kdbench.results.record import new_result
    from kdbench.results.schema import check_result

    plain = parse_experiment(_minimal(methods={"sft": {}, "kd": {}}, models={"families": ["gpt2"]}), "t")
    control = ControlConfig(task="modes", better="kd", worse="sft", mechanism="m", source="s")
    declared = plain.model_copy(update={"controls": [control]})
    graphs = [collect(e, registries, resolve_selection(e, registries, ["sft", "kd"], ["gpt2"], 1))
              for e in (plain, declared)]
    assert [(node.label, node.key) for node in graphs[0]] == [(node.label, node.key) for node in graphs[1]]
    assert [node.spec.config for node in graphs[0].cells()] == [node.spec.config for node in graphs[1].cells()]
    node = next(iter(graphs[1].cells()))
    failure = {"reason": "r", "stage": "s", "stage_key": "k", "step": None}
    identity = cell_identity(SimpleNamespace(experiment=declared, graph=graphs[1]), node)  # type: ignore[arg-type]
    result = new_result(identity, "failed", failure)
    assert result["controls"] == [{"task": "modes", "better": "kd", "worse": "sft", "mechanism": "m", "source": "s"}]
    check_result(json.loads(json.dumps(result)), "the cell's result")


# -- config_hash ---------------------------------------------------------------------------------

def test_config_hash_ignores_key_order_and_tracks_values() -> None:
    """Same content in another key order hashes the same; any changed value changes the hash."""
    a = {"x": 1, "nested": {"p": [1, 2], "q": "s"}, "y": 0.5}
    b = {"y": 0.5, "nested": {"q": "s", "p": [1, 2]}, "x": 1}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "y": 0.25})
    assert config_hash(a) != config_hash({**a, "nested": {"p": [2, 1], "q": "s"}})
    assert len(config_hash(a)) == 16


def test_config_hash_of_experiment_dump_is_stable() -> None:
    """Hashing the dumped default experiment twice agrees, and a changed lr changes it."""
    experiment = load_experiment(None)
    dumped = experiment.model_dump(mode="json")
    assert config_hash(dumped) == config_hash(load_experiment(None).model_dump(mode="json"))
    changed = experiment.model_copy(update={"training": experiment.training.model_copy(update={"lr": 1e-4})})
    assert config_hash(changed.model_dump(mode="json")) != config_hash(dumped)


# -- CLI -----------------------------------------------------------------------------------------

def test_cli_runner_validate_ok() -> None:
    """`kdbench validate experiments/tiny.yaml` through typer succeeds and says ok."""
    result = CliRunner().invoke(app, ["validate", str(REPO / "experiments" / "tiny.yaml")])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_cli_runner_validate_bad_raises_kdbench_error(tmp_path: Path) -> None:
    """Through typer (no main wrapper) a bad file surfaces as a KdbenchError naming every path."""
    bad = _write(tmp_path / "bad.yaml", MANY_MISTAKES)
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code != 0
    assert isinstance(result.exception, KdbenchError)
    for path in MISTAKE_PATHS:
        assert f"{path}:" in str(result.exception)


def test_validate_lists_a_bad_method_parameter_beside_the_schemas_errors(tmp_path: Path) -> None:
    """A method's parameters are checked from the raw block, so a file with schema errors elsewhere still shows them
    (a temperature of 0 used to appear only once the rest was fixed)."""
    bad = _write(tmp_path / "bad.yaml", {**MANY_MISTAKES, "methods": {"kd": {"temperature": 0}, "kdd": {}}})
    result = CliRunner().invoke(app, ["validate", str(bad)])
    message = str(result.exception)
    assert isinstance(result.exception, KdbenchError) and f"{len(MISTAKE_PATHS) + 2} error(s)" in message, message
    for path in (*MISTAKE_PATHS, "methods.kdd"):
        assert f"{path}:" in message, (path, message)
    assert "methods.kd.temperature must be > 0, got 0.0" in message


@pytest.mark.slow
def test_validate_subprocess_exit_codes(tmp_path: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    """The installed command: bad file → exit 2, paths on stderr, no traceback; tiny.yaml → exit 0."""
    bad = _write(tmp_path / "bad.yaml", MANY_MISTAKES)
    semantic = _write(tmp_path / "semantic.yaml", _minimal(methods={"kdd": {}, "kd": {"temprature": 2}}))
    result = subprocess.run([str(KDBENCH), "validate", str(bad), str(semantic)], capture_output=True, text=True,
                            env=subprocess_env(COLUMNS="300"), cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for path in (*MISTAKE_PATHS, "methods.kdd", "methods.kd.temprature"):
        assert f"{path}:" in result.stderr, (path, result.stderr)

    good = subprocess.run([str(KDBENCH), "validate", str(REPO / "experiments" / "tiny.yaml")], capture_output=True,
                          text=True, env=subprocess_env(COLUMNS="300"), cwd=REPO, timeout=300)
    assert good.returncode == 0, good.stderr
    assert "Traceback" not in good.stderr
