"""The grid: stages, their cache, and one result folder per cell.

Stages, each cached under a key of everything it depends on:
data → tokenizer (tiny scale) → model init (tiny scale) → teacher SFT → each cell's training →
evaluation. A cell is (family, student, method, training seed); every cell of one experiment gets
the same settings except its objective and that objective's parameters. The runner only calls
hooks and objective classes: it never branches on an objective's name.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdbench import distributed, results
from kdbench.cache import StageCache
from kdbench.config import EvalDatasetConfig, Experiment, TrainingConfig, config_hash
from kdbench.data import TEMPLATE_PIECES, Record, TokenizedExample, format_prompt, tokenize_records
from kdbench.engine import Tracking, save_trained, train
from kdbench.errors import KdbenchError
from kdbench.evaluation import evaluate
from kdbench.generation import GREEDY, batch_progress, generate_responses
from kdbench.objectives import Need, Objective, ObjectiveParams
from kdbench.registry import Registries
from kdbench.zoo import (
    ModelFamily,
    build_tiny_model,
    check_same_vocabulary,
    count_parameters,
    load_model,
    load_tokenizer,
    train_tokenizer,
)

TEACHER_METHOD = "teacher"
LM_EVAL_SEED = "lm-eval"  # the eval-seed label of lm-eval scores (lm-eval decodes greedily, once)
# Keys of a cell's config that are the method's own; everything else is shared by every cell it is compared with.
METHOD_KEYS = ("method", "params", "method_training", "student")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SilentObservers:
    """Stands in for the hook relay on every process but the main one, so progress is drawn once."""

    def __getattr__(self, name: str) -> Any:
        return lambda **kwargs: None


@dataclass(frozen=True)
class ModelRef:
    """A model folder or hub name, and the cache inputs that identify what it holds."""

    label: str
    path: str
    inputs: dict[str, Any]


@dataclass(frozen=True)
class Cell:
    """One leaderboard entry to produce: (family, student, method, training seed) and its resolved settings."""

    family: str
    student: str
    method: str
    seed: int
    kind: str  # "student", or "teacher" for the teacher's own row
    config: dict[str, Any]
    eval_seeds: list[str]

    @property
    def label(self) -> str:
        return f"{self.family}/{self.student}/{self.method}/seed{self.seed}"

    @property
    def shared_hash(self) -> str:
        """Hash of everything but the objective: equal across the cells a leaderboard compares."""
        return config_hash({k: v for k, v in self.config.items() if k not in METHOD_KEYS})

    def finished(self, out_dir: Path) -> dict[str, Any] | None:
        directory = results.cell_dir(out_dir, self.family, self.student, self.method, self.seed)
        return results.finished_result(directory, config_hash(self.config))


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
    if errors:
        raise KdbenchError(" ".join(errors))
    seeds = list(range(n_seeds)) if n_seeds is not None else list(experiment.seeds)
    eval_seeds = [str(s) for s in experiment.evaluation.seeds] + ([GREEDY] if experiment.evaluation.greedy else [])
    return Selection(methods, families, seeds, eval_seeds)


def semantic_errors(experiment: Experiment, registries: Registries) -> list[str]:
    """Problems a schema cannot see: unknown plugin names and bad objective parameters."""
    errors = dataset_errors("data", experiment.data.dataset, experiment.data.options, registries)
    for label, extra in experiment.evaluation.datasets.items():
        errors += dataset_errors(f"evaluation.datasets.{label}", extra.dataset, extra.options, registries)
    if experiment.evaluation.lm_eval.tasks:
        from kdbench.lmeval import unknown_tasks

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
    for method, values in experiment.methods.items():
        if method not in registries.objectives:
            errors.append(f"methods.{method}: {registries.objectives.unknown_message(method)}")
            continue
        try:
            registries.objectives.get(method).make_params(values or {}, where=f"methods.{method}.")
        except KdbenchError as error:
            errors.append(str(error))
    return errors


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


class Runner:
    def __init__(self, experiment: Experiment, registries: Registries, out_dir: Path, cache_dir: Path) -> None:
        self.experiment = experiment
        self.registries = registries
        self.out_dir = out_dir
        self.cache = StageCache(cache_dir)
        self.hook = registries.manager.hook if distributed.is_main() else SilentObservers()
        self.metrics = [registries.metrics.get(name) for name in experiment.evaluation.metrics]
        self._data_key = {"dataset": experiment.data.dataset, "options": experiment.data.options}
        self._splits: dict[str, list[Record]] | None = None
        self._extra_splits: dict[str, list[Record]] = {}
        # The frozen teacher and evaluated models run in the training precision on this process's device.
        self.dtype = PRECISION_DTYPES[experiment.training.precision]
        self.device = distributed.device()

    # -- stages -------------------------------------------------------------------------------
    def splits(self) -> dict[str, list[Record]]:
        if self._splits is None:
            spec = self.registries.datasets.get(self.experiment.data.dataset)
            self._splits = spec.load(dict(self.experiment.data.options))
        return self._splits

    def eval_records(self, tokenizer: Any, extra: EvalDatasetConfig | None = None) -> list[Record]:
        """The evaluation split (of the experiment's data, or of an extra evaluation set) without prompts
        over ``data.max_prompt_length`` tokens (as both papers drop them), without gold responses under the
        set's ``min_response_tokens``, cut to ``max_examples``."""
        evaluation = self.experiment.evaluation
        if extra is None:
            records, min_response, max_examples = self.splits()[evaluation.split], 0, evaluation.max_examples
        else:
            key = config_hash(extra.model_dump())
            if key not in self._extra_splits:
                self._extra_splits[key] = self.registries.datasets.get(extra.dataset).load(dict(extra.options))[extra.split]
            records, min_response, max_examples = self._extra_splits[key], extra.min_response_tokens, extra.max_examples

        def n_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        limit = self.experiment.data.max_prompt_length
        kept = [r for r in records if n_tokens(format_prompt(r)) <= limit
                and (min_response == 0 or n_tokens(r["response"]) >= min_response)]
        return kept[:max_examples] if max_examples else kept

    def _stage(self, label: str, cache_stage: str, inputs: dict[str, Any], build: Any,
               collective: bool = False) -> tuple[Path, bool]:
        """Reuse or build one cache entry, reporting it to the observers as stage ``label``. Every process
        builds a ``collective`` stage (training, sharded generation); the main process alone builds the rest."""
        stage = f"{label}: {cache_stage}"
        self.hook.kdbench_on_stage_start(stage=stage, total=None)
        started = time.perf_counter()
        path, cached = self.cache.get_or_build(cache_stage, inputs, build, collective)
        self.hook.kdbench_on_stage_end(stage=stage, seconds=time.perf_counter() - started, cached=cached)
        return path, cached

    def tokenizer_dir(self) -> tuple[Path, dict[str, Any]]:
        inputs = {"data": self._data_key, "vocab_size": self.experiment.data.tokenizer_vocab_size}

        def build(folder: Path) -> None:
            texts = (format_prompt(r) + r["response"] for r in self.splits()["train"])
            train_tokenizer(texts, self.experiment.data.tokenizer_vocab_size, folder, TEMPLATE_PIECES)

        path, _ = self._stage("data", "tokenizer", inputs, build)
        return path, inputs

    def checkpoints(self, family: ModelFamily) -> tuple[ModelRef, list[ModelRef]]:
        """The teacher and the selected students to start from: hub names or local paths at paper
        scale, tiny models built (and cached) from the family's config class at tiny scale."""
        models = self.experiment.models
        teacher_label, student_labels = family.checkpoints(models.scale, models.students)
        if models.scale == "paper":
            def named(label: str, path: str) -> ModelRef:
                return ModelRef(label, path, {"checkpoint": path})

            teacher = named(teacher_label, models.teachers.get(family.name, teacher_label))
            overrides = models.student_paths.get(family.name, {})
            return teacher, [named(label, overrides.get(label, name)) for label, name in student_labels.items()]

        tokenizer_path, tokenizer_inputs = self.tokenizer_dir()
        tokenizer = load_tokenizer(str(tokenizer_path))

        def init(label: str, arch: Any, seed: int) -> ModelRef:
            inputs = {"family": family.name, "arch": dataclasses.asdict(arch), "tokenizer": tokenizer_inputs,
                      "max_length": self.experiment.data.max_length, "seed": seed}
            path, _ = self._stage(f"{family.name}/{label}", "init", inputs, lambda folder: build_tiny_model(
                family, arch, tokenizer, self.experiment.data.max_length, seed, folder))
            return ModelRef(label, str(path), inputs)

        teacher = init(teacher_label, family.tiny_teacher, self.experiment.teacher.seed)
        return teacher, [init(label, family.tiny_students[label], 0) for label in student_labels]

    def tokenized_train(self, tokenizer: Any) -> list[TokenizedExample]:
        data = self.experiment.data
        inputs = {"data": self._data_key, "tokenizer": config_hash(tokenizer.backend_tokenizer.to_str()),
                  "max_length": data.max_length, "max_prompt_length": data.max_prompt_length}

        def build(folder: Path) -> None:
            examples = tokenize_records(self.splits()["train"], tokenizer, data.max_length, data.max_prompt_length)
            if not examples:
                raise KdbenchError(f"no training example fits data.max_prompt_length={data.max_prompt_length}; "
                                   "raise it or shorten the prompts.")
            (folder / "train.json").write_text(json.dumps([dataclasses.asdict(e) for e in examples]))

        path, _ = self._stage("data", "tokenize", inputs, build)
        return [TokenizedExample(**e) for e in json.loads((path / "train.json").read_text())]

    def teacher_generations(self, teacher_ref: ModelRef, teacher: Any) -> tuple[list[TokenizedExample], dict[str, Any]]:
        """One sampled teacher response per training prompt, generated once and cached by teacher,
        data and generation settings; tokenised in the order of ``tokenized_train``."""
        settings = self.experiment.teacher_generations
        tokenizer = load_tokenizer(teacher_ref.path)
        inputs = {"teacher": teacher_ref.inputs, "data": self._data_key, "generation": settings.model_dump()}

        def build(folder: Path) -> None:
            records = self.splits()["train"]
            advance = batch_progress(self.hook, f"{teacher_ref.label}: generate",
                                     -(-distributed.shard_size(len(records)) // settings.batch_size))
            responses = distributed.map_sharded(records, lambda share: generate_responses(
                teacher, tokenizer, share, str(settings.seed), settings.max_new_tokens, settings.batch_size, advance))
            (folder / "generations.json").write_text(json.dumps(responses))

        path, _ = self._stage(teacher_ref.label, "generate", inputs, build, collective=True)
        responses = json.loads((path / "generations.json").read_text())
        records = [{**record, "response": response} for record, response in zip(self.splits()["train"], responses)]
        data = self.experiment.data
        # Prompts are the gold ones, so the same records survive the prompt-length filter: index i of
        # both lists is the same prompt.
        return tokenize_records(records, tokenizer, data.max_length, data.max_prompt_length), inputs

    def trained(self, label: str, init: ModelRef, objective: type[Objective], params: ObjectiveParams,
                settings: TrainingConfig, seed: int, teacher: Any = None, teacher_ref: ModelRef | None = None,
                target: tuple[list[TokenizedExample], dict[str, Any]] | None = None) -> tuple[ModelRef, dict[str, Any]]:
        """``init`` trained with ``objective`` (cached): the trained model and its training stats.
        ``target`` is the sequences the objective reads instead of the gold ones, with their cache inputs."""
        data = self.experiment.data
        needs = objective.needs_for(params)
        inputs = {"init": init.inputs, "objective": objective.name, "params": dataclasses.asdict(params),
                  "training": settings.model_dump(), "seed": seed,
                  "teacher": teacher_ref.inputs if teacher_ref and Need.TEACHER_LOGITS in needs else None,
                  "target": target[1] if target else None,
                  "sample_max_new_tokens": self.experiment.teacher_generations.max_new_tokens
                  if needs & {Need.STUDENT_SAMPLES, Need.ROLLOUTS} else None,
                  "data": self._data_key, "max_length": data.max_length, "max_prompt_length": data.max_prompt_length}

        def build(folder: Path) -> None:
            tokenizer = load_tokenizer(init.path)
            examples = self.tokenized_train(tokenizer)
            model, stats, accelerator = train(lambda: load_model(init.path), objective, params, examples, settings, seed,
                                              tokenizer.pad_token_id, teacher, self.hook, f"{label}: train",
                                              target_examples=target[0] if target else None,
                                              sample_max_new_tokens=self.experiment.teacher_generations.max_new_tokens,
                                              eos_id=tokenizer.eos_token_id,
                                              tracking=self.tracking(label, objective, params, settings))
            save_trained(model, accelerator, tokenizer, folder)
            accelerator.free_memory()  # the engine's optimizer state leaves the GPU before evaluation loads a model
            stats_payload = dataclasses.asdict(stats)
            log = stats_payload.pop("log")
            (folder / "train_stats.json").write_text(json.dumps(stats_payload))
            (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))

        path, _ = self._stage(label, "train", inputs, build, collective=True)
        return ModelRef(init.label, str(path), inputs), json.loads((path / "train_stats.json").read_text())

    def tracking(self, label: str, objective: type[Objective], params: ObjectiveParams,
                 settings: TrainingConfig) -> Tracking | None:
        """Where the experiment's trackers log this training stage: ``<out>/tracking/<label>``."""
        if not self.experiment.trackers:
            return None
        flat = {"objective": objective.name, **{f"params.{k}": v for k, v in dataclasses.asdict(params).items()},
                **{f"training.{k}": v for k, v in settings.model_dump().items()}}
        scalars = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
        return Tracking(tuple(self.experiment.trackers), str(self.out_dir / "tracking"), label, scalars)

    def load_frozen(self, path: str) -> Any:
        """A model that is only run, never trained (the teacher, an evaluated student): training precision,
        this process's device."""
        return load_model(path, self.dtype, self.device)

    def train_cell(self, cell: Cell, student: ModelRef, objective: type[Objective], params: ObjectiveParams,
                   teacher: Any, teacher_ref: ModelRef) -> tuple[ModelRef, dict[str, Any]]:
        """Provide what the objective declares it needs, then train. Never branches on its name."""
        needs = objective.needs_for(params)
        experiment = self.experiment
        init = student
        if Need.SFT_INIT in needs:  # the very cache entry the sft cell of this student and seed trains
            sft = self.registries.objectives.get("sft")
            init, _ = self.trained(f"{cell.family}/{student.label}/sft/seed{cell.seed}", student, sft,
                                   sft.make_params({}), experiment.training_for(sft.name), cell.seed)
        target = self.teacher_generations(teacher_ref, teacher) if Need.TEACHER_GENERATIONS in needs else None
        return self.trained(cell.label, init, objective, params, experiment.training_for(objective.name), cell.seed,
                            teacher, teacher_ref, target)

    # -- cells --------------------------------------------------------------------------------
    def write_cell(self, cell: Cell, model: ModelRef, train_stats: dict[str, Any], teacher_params: int,
                   started: float, network: Any = None) -> dict[str, Any]:
        """Evaluate ``model`` (``network``, when it is already loaded) and write the cell's folder;
        ``result.json`` goes last."""
        directory = results.cell_dir(self.out_dir, cell.family, cell.student, cell.method, cell.seed)
        evaluation = self.experiment.evaluation
        tokenizer = load_tokenizer(model.path)
        network = network if network is not None else self.load_frozen(model.path)
        records = self.eval_records(tokenizer)
        scores = evaluate(network, tokenizer, records, self.metrics, cell.eval_seeds, evaluation.max_new_tokens,
                          evaluation.batch_size, self.hook, f"{cell.label}: eval")
        eval_examples = {"": len(records)}
        for label, extra in evaluation.datasets.items():  # extra sets: "<label>/<metric>" columns
            extra_records = self.eval_records(tokenizer, extra)
            extra_scores = evaluate(network, tokenizer, extra_records, self.metrics, cell.eval_seeds,
                                    evaluation.max_new_tokens, evaluation.batch_size, self.hook,
                                    f"{cell.label}: eval {label}")
            scores["metrics"].update({f"{label}/{name}": v for name, v in extra_scores["metrics"].items()})
            scores["per_task"].update({f"{label}/{seed}": v for seed, v in extra_scores["per_task"].items()})
            scores["seconds"] += extra_scores["seconds"]
            eval_examples[label] = len(extra_records)
        higher_is_better = {name: m.higher_is_better for name in scores["metrics"] for m in self.metrics
                            if name.rsplit("/", 1)[-1] == m.name}
        if evaluation.lm_eval.tasks:
            scores["seconds"] += self.score_lm_eval(network, tokenizer, records, scores["metrics"], higher_is_better)
        train_seconds = float(train_stats.get("seconds", 0.0))
        result = {
            "schema_version": results.SCHEMA_VERSION,
            "experiment": self.experiment.name,
            "config_hash": config_hash(cell.config),
            "shared_config_hash": cell.shared_hash,
            "family": cell.family, "student": cell.student, "method": cell.method, "kind": cell.kind,
            "train_seed": cell.seed,
            "metrics": scores["metrics"],
            "higher_is_better": higher_is_better,
            "per_task": scores["per_task"],
            "eval_examples": eval_examples[""],
            "eval_examples_by_dataset": eval_examples,
            "wall_seconds": {"train": train_seconds, "eval": scores["seconds"],
                             "total": train_seconds + scores["seconds"], "this_run": time.perf_counter() - started},
            "tokens": {"train": train_stats.get("tokens", 0), "response": train_stats.get("response_tokens", 0)},
            "optimizer_steps": train_stats.get("steps", 0),
            "processes": distributed.world_size(),  # data-parallel processes that trained and evaluated it
            "forward_passes": {"student": train_stats.get("student_forwards", 0),
                               "teacher": train_stats.get("teacher_forwards", 0)},
            "params": {"teacher": teacher_params} if cell.kind == "teacher" else
                      {"student": count_parameters(network), "teacher": teacher_params},
            "peak_memory_mb": results.peak_memory_mb(),
            "versions": results.versions(),
            "finished_at": results.now_iso(),
        }
        if distributed.is_main():
            results.atomic_write_json(directory / "config.json", cell.config)
            results.atomic_write_json(directory / "samples.json", scores["samples"])
            train_log = Path(model.path) / "train_log.jsonl"
            if train_log.is_file():
                results.atomic_write_text(directory / "train_log.jsonl", train_log.read_text())
            results.atomic_write_json(directory / "result.json", result)  # last: marks the cell finished
        distributed.barrier()  # every process sees the finished cell before any moves on
        self.hook.kdbench_on_cell_end(cell=cell.label, result=result)
        return result

    def score_lm_eval(self, model: Any, tokenizer: Any, heldout: list[Record], metrics: dict[str, dict[str, float]],
                      higher_is_better: dict[str, bool]) -> float:
        """lm-eval tasks on the in-memory model, added to ``metrics`` as ``lm_eval/<task>/<metric>``; returns
        the seconds taken. lm-eval runs an in-memory model in one process, so the main process scores it."""
        from kdbench.lmeval import lm_eval_scores

        started = time.perf_counter()
        if distributed.is_main():
            work_dir = self.cache.root / "lm_eval" / config_hash([format_prompt(r) for r in heldout])
            scores = lm_eval_scores(model, tokenizer, self.experiment.evaluation.lm_eval, heldout, work_dir)
            for name, value in scores.values.items():
                metrics[f"lm_eval/{name}"] = {LM_EVAL_SEED: value}
                higher_is_better[f"lm_eval/{name}"] = scores.higher_is_better[name]
        return time.perf_counter() - started

    def run(self, selection: Selection) -> list[dict[str, Any]]:
        experiment = self.experiment
        started = time.perf_counter()
        cells = [f"{f}/{m}/seed{s}" for f in selection.families for m in selection.methods for s in selection.seeds]
        self.hook.kdbench_on_run_start(plan={"experiment": experiment.name, "out_dir": str(self.out_dir), "cells": cells})
        shared = {"experiment": experiment.name, "data": experiment.data.model_dump(), "scale": experiment.models.scale,
                  "training": experiment.training.model_dump(), "teacher_training": experiment.teacher_training.model_dump(),
                  "evaluation": experiment.evaluation.model_dump(), "eval_seeds": selection.eval_seeds,
                  "teacher_generations": experiment.teacher_generations.model_dump()}
        written: list[dict[str, Any]] = []
        for family in selection.families:
            written += self.run_family(self.registries.families.get(family), selection, shared)
        self.hook.kdbench_on_run_end(out_dir=str(self.out_dir), seconds=time.perf_counter() - started)
        return written

    def run_family(self, family: ModelFamily, selection: Selection, shared: dict[str, Any]) -> list[dict[str, Any]]:
        """The teacher (SFT first when the experiment says so) and every student cell of one family."""
        experiment = self.experiment
        teacher_ref, students = self.checkpoints(family)
        teacher_tokenizer = load_tokenizer(teacher_ref.path)
        for student in students:  # before any training: a mismatch is the user's to fix, not a crash later
            check_same_vocabulary(teacher_tokenizer, load_tokenizer(student.path), teacher_ref.path, student.path)
        teacher_stats: dict[str, Any] = {}
        if experiment.teacher.train:
            sft = self.registries.objectives.get("sft")
            teacher_ref, teacher_stats = self.trained(f"{family.name}/{teacher_ref.label}", teacher_ref, sft,
                                                      sft.make_params({}), experiment.teacher_training,
                                                      experiment.teacher.seed)
        teacher = self.load_frozen(teacher_ref.path)
        teacher_params = count_parameters(teacher)
        base = {**shared, "family": family.name, "teacher": {"label": teacher_ref.label, "inputs": teacher_ref.inputs}}

        written: list[dict[str, Any]] = []
        teacher_cell = Cell(family.name, teacher_ref.label, TEACHER_METHOD, experiment.teacher.seed, "teacher",
                            {**base, "method": TEACHER_METHOD, "params": {}, "seed": experiment.teacher.seed},
                            selection.eval_seeds)
        written.append(teacher_cell.finished(self.out_dir) or self.write_cell(
            teacher_cell, teacher_ref, teacher_stats, teacher_params, time.perf_counter(), network=teacher))

        for student in students:
            for method in selection.methods:
                objective = self.registries.objectives.get(method)
                params = method_params(experiment, objective)
                for seed in selection.seeds:
                    started = time.perf_counter()
                    cell = Cell(family.name, student.label, method, seed, "student",
                                {**base, "student": {"label": student.label, "inputs": student.inputs},
                                 "method": method, "params": dataclasses.asdict(params),
                                 "method_training": experiment.method_training.get(method, {}), "seed": seed},
                                selection.eval_seeds)
                    done = cell.finished(self.out_dir)
                    if done is not None:  # resumed: this cell finished in an earlier run
                        written.append(done)
                        continue
                    trained, stats = self.train_cell(cell, student, objective, params, teacher, teacher_ref)
                    written.append(self.write_cell(cell, trained, stats, teacher_params, started))
        return written
