"""What a ``kdbench run`` asks for, checked against the installed plugins before anything is collected.

Every problem is reported at once: a typo in ``--methods`` and an unknown dataset in the experiment
file come back in one message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdbench.config import Experiment
from kdbench.errors import KdbenchError
from kdbench.objectives import GOLD, Objective, ObjectiveParams
from kdbench.registry import Registries
from kdbench.train.generation import GREEDY
from kdbench.train.step import step_reads


@dataclass(frozen=True)
class Selection:
    """The sub-grid a ``kdbench run`` asks for, checked against the registries."""

    methods: list[str]
    families: list[str]
    seeds: list[int]
    eval_seeds: list[str]


def resolve_selection(experiment: Experiment, registries: Registries, methods: list[str] | None,
                      families: list[str] | None, n_seeds: int | None) -> Selection:
    """Check every name at once, so a typo in --methods and one in --models are reported together."""
    methods = methods or list(experiment.methods)
    families = families or list(experiment.models.families)
    errors = [registries.objectives.unknown_message(m) for m in methods if m not in registries.objectives]
    errors += [registries.families.unknown_message(f) for f in families if f not in registries.families]
    errors += semantic_errors(experiment, registries)
    for method in methods:  # the experiment's own methods were checked with it
        if method in registries.objectives and method not in experiment.methods:
            errors += source_errors(registries.objectives.get(method), registries)
    if errors:
        raise KdbenchError(" ".join(errors))
    seeds = list(range(n_seeds)) if n_seeds is not None else list(experiment.seeds)
    eval_seeds = [str(s) for s in experiment.evaluation.seeds] + ([GREEDY] if experiment.evaluation.greedy else [])
    return Selection(methods, families, seeds, eval_seeds)


def semantic_errors(experiment: Experiment, registries: Registries) -> list[str]:
    """Problems a schema cannot see: unknown plugin names, bad objective parameters, sources nobody provides."""
    errors = dataset_errors("data", experiment.data.dataset, experiment.data.options, registries)
    for label, extra in experiment.evaluation.datasets.items():
        errors += dataset_errors(f"evaluation.datasets.{label}", extra.dataset, extra.options, registries)
    if experiment.teacher.data is not None:
        errors += dataset_errors("teacher.data", experiment.teacher.data.dataset, experiment.teacher.data.options,
                                 registries)
    corpora = {"lm_data": experiment.lm_data, "pretrain.corpus": experiment.pretrain and experiment.pretrain.corpus}
    for where, corpus in corpora.items():
        if corpus is None:
            continue
        errors += dataset_errors(where, corpus.dataset, corpus.options, registries)
        if corpus.dataset in registries.datasets and registries.datasets.get(corpus.dataset).corpus is None:
            errors.append(f"{where}.dataset: {corpus.dataset!r} has no plain-text corpus; expected one of "
                          f"{sorted(n for n in registries.datasets.names() if registries.datasets.get(n).corpus)}")
    if experiment.evaluation.lm_eval.tasks:
        from kdbench.eval.lmeval import unknown_tasks

        errors += [f"evaluation.lm_eval.tasks: {e}" for e in unknown_tasks(experiment.evaluation.lm_eval)]
    errors += tracker_errors(experiment.trackers)
    for method in experiment.method_training:
        if method not in experiment.methods:
            errors.append(f"method_training.{method}: not a method of this experiment; expected one of "
                          f"{sorted(experiment.methods)}")
    for family in experiment.models.families:
        if family not in registries.families:
            errors.append(f"models.families: {registries.families.unknown_message(family)}")
    for metric in experiment.evaluation.metrics:
        if metric not in registries.metrics:
            errors.append(f"evaluation.metrics: {registries.metrics.unknown_message(metric)}")
    chosen_on = experiment.selection.metric
    if chosen_on != "loss" and chosen_on not in experiment.evaluation.metrics:
        errors.append(f"selection.metric: {chosen_on!r} is not one of evaluation.metrics {experiment.evaluation.metrics}; "
                      "pick one of them, or 'loss' (validation cross-entropy)")
    errors += method_errors(experiment.methods, registries)
    errors += control_errors(experiment, registries)
    return errors


def method_errors(methods: Any, registries: Registries) -> list[str]:
    """Unknown objectives and bad parameters in an experiment's ``methods`` block; checked from the raw block too, so
    ``kdbench validate`` lists them beside the schema's errors of the rest of the file."""
    errors: list[str] = []
    for method, values in (methods.items() if isinstance(methods, dict) else ()):
        if method not in registries.objectives:
            errors.append(f"methods.{method}: {registries.objectives.unknown_message(method)}")
            continue
        objective = registries.objectives.get(method)
        params = None
        try:
            params = objective.make_params(values if isinstance(values, dict) else {}, where=f"methods.{method}.")
        except KdbenchError as error:
            errors.append(str(error))
        errors += source_errors(objective, registries, params)
    return errors


def control_errors(experiment: Experiment, registries: Registries) -> list[str]:
    """Positive controls that could never be tested: a method that is not a registered objective or not run by this
    experiment, or a task the experiment's data does not have (checked only where the dataset knows its tasks without
    loading its records)."""
    tasks = dataset_tasks(experiment.data.dataset, experiment.data.options, registries)
    methods = sorted(experiment.methods)
    errors = []
    for index, control in enumerate(experiment.controls):
        where = f"controls[{index}]"
        for role, name in (("better", control.better), ("worse", control.worse)):
            if name not in registries.objectives:
                errors.append(f"{where}.{role}: {registries.objectives.unknown_message(name)} Name a registered "
                              "objective (`kdbench plugins` lists them).")
            elif name not in experiment.methods:
                errors.append(f"{where}.{role}: {name!r} is not one of this experiment's methods {methods}; add it to "
                              "methods or name one of them")
        if tasks is not None and control.task not in tasks:
            errors.append(f"{where}.task: {control.task!r} is not a task of data.dataset {experiment.data.dataset!r} "
                          f"with these options; expected one of {list(tasks)}; name one of them, or change data.options "
                          "so the data has that task")
    return errors


def dataset_tasks(name: str, options: dict[str, Any], registries: Registries) -> tuple[str, ...] | None:
    """The task labels of a dataset's records, or None when it cannot tell without loading them (or its name or
    options are wrong, which dataset_errors reports)."""
    if name not in registries.datasets or dataset_errors("data", name, options, registries):
        return None
    spec = registries.datasets.get(name)
    if spec.tasks is None:
        return None
    try:
        return tuple(spec.tasks(dict(options)))
    except (KdbenchError, TypeError, ValueError):  # options of the wrong type: the data stage reports them
        return None


def source_errors(objective: type[Objective], registries: Registries, params: ObjectiveParams | None = None) -> list[str]:
    """An objective that reads a source no plugin registers (with ``params``: the sources those parameters make it
    read, ``train_on`` included), or two sources that both choose the prompts."""
    where = f"objective {objective.name!r} ({registries.objectives.origin(objective.name)})"
    reads = (GOLD, *objective.reads) if params is None else step_reads(objective, params)
    unknown = [name for name in reads if name not in registries.sources]
    if unknown:
        return [f"{where} reads {registries.sources.unknown_message(name)}" for name in unknown]
    drivers = [name for name in reads if registries.sources.get(name).drives_prompts]
    if len(drivers) > 1:
        return [f"{where} reads {drivers}, which each choose the prompts of a step; an objective may read at most one"]
    return []


def dataset_errors(where: str, name: str, options: dict[str, Any], registries: Registries) -> list[str]:
    """An unknown dataset, or options it does not take, reported under the config path ``where``."""
    if name not in registries.datasets:
        return [f"{where}.dataset: {registries.datasets.unknown_message(name)}"]
    accepted = registries.datasets.get(name).option_names
    return [f"{where}.options.{option}: not an option of dataset {name!r}; expected some of {list(accepted)}"
            for option in sorted(set(options) - set(accepted))]


def tracker_errors(trackers: list[str]) -> list[str]:
    """Trackers whose package is missing: accelerate would otherwise drop them with only a log line."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    return [f"trackers: {name} is not installed; pip install {name} (or remove it from trackers)"
            for name in trackers if not available[name]()]


def method_params(experiment: Experiment, objective: type[Objective]) -> ObjectiveParams:
    return objective.make_params(experiment.methods.get(objective.name) or {}, where=f"methods.{objective.name}.")
