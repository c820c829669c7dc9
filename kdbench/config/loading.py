"""Experiment files read into an ``Experiment``: YAML parsed, model paths made absolute, and every problem
reported at once, one line per field with its path (``training.lr: Input should be greater than 0``), so a user
fixes a file in one pass."""

from __future__ import annotations

import difflib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kdbench.config.schema import DEFAULT_EXPERIMENT, Experiment
from kdbench.errors import KdbenchError


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The config class that holds the field at ``loc`` (its last part), walking from ``Experiment`` through
    nested configs, optional ones and dicts of them; None where the walk leaves the typed schema."""
    model: type[BaseModel] = Experiment
    annotation: Any = None
    for part in loc[:-1]:
        if annotation is None:
            if not isinstance(part, str) or part not in model.model_fields:
                return None
            annotation = model.model_fields[part].annotation
        else:  # a key of a dict of configs (evaluation.datasets.<label>)
            annotation = typing.get_args(annotation)[-1] if typing.get_origin(annotation) is dict else None
        while typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
            annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model, annotation = annotation, None
        elif typing.get_origin(annotation) is not dict:
            return None
    return model if annotation is None else None


def _given(value: Any, limit: int = 80) -> str:
    """A given value as the message shows it: its repr, cut short (a misplaced block can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def _unknown_field(loc: tuple[int | str, ...]) -> str:
    """An unknown key: the closest field names and every field the config at that place takes."""
    model, name = _model_at(loc), str(loc[-1])
    where = ".".join(str(part) for part in loc[:-1]) or "the experiment"
    if model is None:
        return f"not a field of {where}; remove it"
    fields = list(model.model_fields)
    close = difflib.get_close_matches(name, fields, n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"not a field of {where}; {hint}expected some of {fields}"


class SchemaErrors(KdbenchError):
    """An experiment file that does not fit the schema; ``lines`` has one problem per field."""

    def __init__(self, source: str, lines: list[str]) -> None:
        super().__init__(f"{source} has {len(lines)} error(s):\n" + "\n".join(lines))
        self.lines = lines


def _error_lines(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        if not item["loc"]:  # a check across fields: its message names the fields itself, one per "; "
            lines += [f"  {part}" for part in item["msg"].removeprefix("Value error, ").split("; ")]
            continue
        path = ".".join(str(part) for part in item["loc"])
        given = "" if item["type"] == "missing" else f" (given: {_given(item.get('input'))})"
        message = (_unknown_field(item["loc"]) if item["type"] == "extra_forbidden"
                   else item["msg"].removeprefix("Value error, "))
        lines.append(f"  {path}: {message}{given}")
    return lines


def parse_experiment(raw: Any, source: str) -> Experiment:
    if raw is None:
        raise KdbenchError(f"{source} is empty; expected a YAML mapping of experiment fields (name, protocol, "
                           "training, ...), such as experiments/tiny.yaml.")
    if not isinstance(raw, dict):
        raise KdbenchError(f"{source} must hold a YAML mapping of experiment fields (name: ..., protocol: ...), got "
                           f"a {type(raw).__name__}: {_given(raw)}. Write one `field: value` per line at the top level.")
    unnamed = [key for key in raw if not isinstance(key, str)]
    if unnamed:  # pydantic would report these as a type error of the whole file
        raise KdbenchError(f"{source}: top-level keys {unnamed} are not field names; expected names such as name, "
                           "protocol, training.")
    try:
        return Experiment.model_validate(raw)
    except ValidationError as error:
        raise SchemaErrors(source, _error_lines(error)) from None


def embedded_experiments() -> Path:
    """The folder of the experiment files (and the tiny suite's shipped teachers) installed with kdbench."""
    return Path(str(resources.files("kdbench.experiments")))


def resolve_model_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Model paths in ``models`` written relative to the experiment file (``teachers/gpt2``) made absolute, so a
    run finds them from any working directory; hub names and absolute paths stay as they are."""
    models = raw.get("models")
    if not isinstance(models, dict):
        return raw

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and not Path(value).is_absolute() and (base / value).is_dir():
            return str((base / value).resolve())
        return value

    teachers = models.get("teachers")
    if isinstance(teachers, dict):
        models = {**models, "teachers": {family: resolve(path) for family, path in teachers.items()}}
    trusted = models.get("trust_remote_code")
    if isinstance(trusted, list):  # resolved as the paths they name, so that the names match
        models = {**models, "trust_remote_code": [resolve(name) for name in trusted]}
    for folders in ("sft_inits", "bases"):
        given = models.get(folders)
        if isinstance(given, dict):
            models = {**models, folders: {family: resolve(path) for family, path in given.items()}}
    paths = models.get("student_paths")
    if isinstance(paths, dict):
        models = {**models, "student_paths": {family: {label: resolve(path) for label, path in labels.items()}
                                              if isinstance(labels, dict) else labels
                                              for family, labels in paths.items()}}
    return {**raw, "models": models}


def read_experiment_yaml(path: Path | None) -> tuple[dict[str, Any], str]:
    """The raw mapping of ``path``, or of the embedded ``experiments/tiny.yaml`` when None, with model paths
    relative to the file resolved."""
    if path is None:
        text = (embedded_experiments() / DEFAULT_EXPERIMENT).read_text(encoding="utf-8")
        source, base = f"experiments/{DEFAULT_EXPERIMENT} (embedded default)", embedded_experiments()
    else:
        text = read_text_file(path, "experiment file", "a YAML file such as experiments/tiny.yaml")
        source, base = str(path), path.parent
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise KdbenchError(f"{source} is not valid YAML: {_yaml_problem(error)}. Expected a YAML mapping of "
                           "experiment fields; fix the syntax there (`kdbench validate` checks a file).") from None
    return (resolve_model_paths(raw, base) if isinstance(raw, dict) else raw), source


def read_text_file(path: Path, what: str, expected: str) -> str:
    """The UTF-8 text of ``path``, or a KdbenchError that says what is wrong with it (absent, a folder, unreadable,
    not text) and what was expected."""
    if path.is_dir():
        raise KdbenchError(f"{what} {path} is a folder; expected {expected}. Pass the file inside it.")
    if not path.exists():
        raise KdbenchError(f"{what} {path} does not exist; expected {expected}. Check the path (relative paths start "
                           f"from {Path.cwd()}).")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KdbenchError(f"{what} {path} is not UTF-8 text; expected {expected}.") from None
    except OSError as error:
        raise KdbenchError(f"cannot read {what} {path} ({error.strerror or error}); expected {expected} that this user "
                           "can read. Fix its permissions or copy it somewhere readable.") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message as one line: the problem and where it is (line and column, counted from 1)."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        problem = ": ".join(part for part in (error.context, error.problem) if part)
        if mark is not None:
            return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
        return problem
    return str(error).replace("\n", " ")


def load_experiment(path: Path | None = None) -> Experiment:
    raw, source = read_experiment_yaml(path)
    return parse_experiment(raw, source)
