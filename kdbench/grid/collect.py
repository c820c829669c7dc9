"""``collect``: the one walk over the grid. Experiment + selection → the stage graph, nothing run.

Per family, in run order: the starting checkpoints (hub names or local folders at paper scale; a
tokenizer trained on the data and randomly initialised models at tiny scale), the tokenised training
split, the teacher's SFT and its evaluation row; then for every student, method and training seed the
stages its objective needs (the shared SFT init, the stored teacher generations or outputs), its training and
its evaluation. Everything downstream of this module — ``--dry-run``, the executors, resume, the
lineage recorded in every result — reads the graph built here.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from kdbench.config import (
    Experiment,
    InstructionSetConfig,
    SelectionConfig,
    TrainingConfig,
)
from kdbench.errors import KdbenchError
from kdbench.grid.graph import Node, StageGraph, StageKind
from kdbench.grid.selection import Selection, method_params
from kdbench.grid.specs import Cell, CheckpointSpec, GenerateSpec, InitSpec, SelectSpec, TrainSpec
from kdbench.grid.stages import BUILDERS
from kdbench.objectives import Need, Objective, ObjectiveParams
from kdbench.registry import Registries
from kdbench.train.step import plan_step
from kdbench.zoo import ModelFamily, TinyArch

TEACHER_METHOD = "teacher"
def folder_fingerprint(folder: Path, max_bytes: int = 256 * 2**20) -> str:
    """``local:<hash>`` of a model folder's file names and contents; a folder over ``max_bytes`` (a paper-scale
    checkpoint) is hashed by names and sizes only, to keep collecting cheap."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    small = sum(p.stat().st_size for p in files) <= max_bytes
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(folder).as_posix().encode())
        digest.update(file.read_bytes() if small else str(file.stat().st_size).encode())
    return f"local:{digest.hexdigest()[:16]}"


# -- the walk --------------------------------------------------------------------------------------

class _Collector:
    def __init__(self, experiment: Experiment, registries: Registries, selection: Selection) -> None:
        self.experiment, self.registries, self.selection = experiment, registries, selection
        self.graph = StageGraph()
        self.data = self.dataset_inputs(experiment.data.dataset, experiment.data.options)
        self.shared = {"experiment": experiment.name, "protocol": experiment.protocol, "init": experiment.init.model_dump(),
                       "selection": experiment.selection.model_dump(), "data": experiment.data.model_dump(),
                       "scale": experiment.models.scale, "training": experiment.training.model_dump(),
                       "teacher_training": experiment.teacher_training.model_dump(),
                       "evaluation": experiment.evaluation.model_dump(), "eval_seeds": selection.eval_seeds,
                       "teacher_generations": experiment.teacher_generations.model_dump()}
        # Set only when used, so the shared settings of experiments without them hash as before.
        if experiment.pretrain is not None:
            self.shared["pretrain"] = experiment.pretrain.model_dump()
        if experiment.teacher.data is not None:
            self.shared["teacher_data"] = experiment.teacher.data.model_dump()
        if experiment.teacher_outputs.share:  # the teacher signal becomes part of the protocol (top-k approximates)
            self.shared["teacher_outputs"] = experiment.teacher_outputs.model_dump(exclude={"batch_size"})

    def dataset_inputs(self, dataset: str, options: dict[str, Any]) -> dict[str, Any]:
        """A data set as stage inputs: its name, options and the version of its generator."""
        return {"dataset": dataset, "options": options, "version": self.registries.datasets.get(dataset).version}

    def add(self, kind: StageKind, label: str, inputs: dict[str, Any], deps: dict[str, str], family: str | None,
            spec: Any = None) -> str:
        return self.graph.add(Node(kind, label, BUILDERS[kind].version, inputs, deps, family, spec))

    # -- starting points ---------------------------------------------------------------------------
    def tokenizer(self) -> str:
        inputs = {"data": self.data, "vocab_size": self.experiment.data.tokenizer_vocab_size}
        pretrain = self.experiment.pretrain
        if pretrain is not None:  # trained on the pretraining text too, as GPT-2's BPE was on WebText
            inputs["corpus"] = self.dataset_inputs(pretrain.corpus.dataset, pretrain.corpus.options)
        return self.add(StageKind.TOKENIZER, "data", inputs, {}, None)

    def tiny_model(self, family: ModelFamily, label: str, arch: TinyArch, seed: int, tokenizer: str,
                   name: str | None = None) -> str:
        inputs = {"family": family.name, "arch": dataclasses.asdict(arch), "max_length": self.experiment.data.max_length,
                  "seed": seed}
        return self.add(StageKind.INIT, f"{family.name}/{name or label}", inputs, {"tokenizer": tokenizer}, family.name,
                        InitSpec(label, family, arch, seed))

    def checkpoint(self, family: ModelFamily, label: str, path: str) -> str:
        """A hub name is keyed by its name; a local folder by its contents, so the key is the same wherever the
        folder lies and changes when its weights do."""
        identity = folder_fingerprint(Path(path)) if Path(path).is_dir() else path
        return self.add(StageKind.CHECKPOINT, f"{family.name}/{label}", {"checkpoint": identity}, {}, family.name,
                        CheckpointSpec(label, path, family))

    def tokenized(self, tokenizer: str, instructions: InstructionSetConfig | None = None) -> str:
        """The training split (of the experiment's data, or of ``instructions``: the teacher's own set) tokenised by
        the tokenizer of ``tokenizer`` (a tokenizer or model node)."""
        data, lm_data = self.experiment.data, self.experiment.lm_data
        source = self.data if instructions is None else self.dataset_inputs(instructions.dataset, instructions.options)
        inputs = {"data": source, "max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
                  "lm_data": None if lm_data is None else lm_data.model_dump()}
        return self.add(StageKind.TOKENIZE, "data" if instructions is None else "teacher data", inputs,
                        {"tokenizer": tokenizer}, None)

    def corpus(self, tokenizer: str) -> str:
        """The pretraining corpus packed into ``data.max_length``-token chunks, the last few held out."""
        pretrain = self.experiment.pretrain
        assert pretrain is not None
        inputs = {"corpus": {**self.dataset_inputs(pretrain.corpus.dataset, pretrain.corpus.options),
                             "max_chunks": pretrain.corpus.max_chunks},
                  "max_length": self.experiment.data.max_length, "validation_chunks": pretrain.validation_chunks}
        return self.add(StageKind.TOKENIZE, "corpus", inputs, {"tokenizer": tokenizer}, None)

    def tiny_base(self, family: ModelFamily, label: str, arch: TinyArch, seed: int, tokenizer: str) -> str:
        """The model a tiny teacher or student starts from: a shipped base (``models.bases``), a base pretrained on
        the corpus here (``pretrain``: one per architecture, whatever the training seed), or a random
        initialisation with ``seed``."""
        experiment = self.experiment
        shipped = experiment.models.bases.get(family.name)
        if shipped is not None:
            folder = Path(shipped) / label
            if not (folder / "config.json").is_file():
                made = sorted(p.name for p in Path(shipped).iterdir() if p.is_dir()) if Path(shipped).is_dir() else []
                raise KdbenchError(
                    f"models.bases.{family.name} = {shipped} holds no base model {label!r} (expected the model folder "
                    f"{folder}; found {made or 'none'}). Run `kdbench export-bases --out {Path(shipped).parent}` with "
                    f"this experiment, or remove models.bases.{family.name} to pretrain the bases in the run.")
            base = self.checkpoint(family, f"{label}/base", str(folder))
            self.graph.bases.add(base)
            return base
        pretrain = experiment.pretrain
        if pretrain is None:
            name = label if label == family.checkpoints("tiny")[0] else f"{label}/seed{seed}"
            return self.tiny_model(family, label, arch, seed, tokenizer, name)
        random_init = self.tiny_model(family, label, arch, pretrain.seed, tokenizer)
        sft = self.registries.objectives.get("sft")
        base = self.trained(family.name, f"{family.name}/{label}/base", random_init, self.corpus(tokenizer), sft,
                            sft.make_params({}), pretrain.training, pretrain.seed,
                            select=self.select("loss", every=pretrain.select_every))
        self.graph.bases.add(base)
        return base

    # -- stages ------------------------------------------------------------------------------------
    def select(self, metric: str | None = None, selection: SelectionConfig | None = None,
               every: int | None = None, rule: str | None = None) -> SelectSpec:
        """``selection`` (the experiment's when None) as a stage's spec, on ``metric``, every ``every`` steps and by
        ``rule`` instead of its own when given."""
        selection, evaluation = selection or self.experiment.selection, self.experiment.evaluation
        return SelectSpec(metric or selection.metric, every or selection.every, (rule or selection.rule) == "best",
                          selection.greedy, selection.max_examples, evaluation.max_new_tokens)

    def trained(self, family: str, label: str, init: str, data: str, objective: type[Objective], params: ObjectiveParams,
                settings: TrainingConfig, seed: int, teacher: str | None = None, select: SelectSpec | None = None) -> str:
        """``init`` trained with ``objective``; the teacher, its stored generations and its stored outputs join the
        deps when the objective or a source it reads uses them."""
        plan = plan_step(objective, params, self.registries.sources, settings)
        stored = teacher is not None and self.experiment.teacher_outputs.share and plan.logits_on_gold
        deps = {"init": init, "data": data}
        if stored:
            assert teacher is not None
            deps["outputs"] = self.teacher_outputs(family, teacher, data)
        if plan.uses_teacher(stored_logits=stored):
            assert teacher is not None, f"{objective.name} needs a teacher"
            deps["teacher"] = teacher
        if plan.teacher_generations:
            assert teacher is not None, f"{objective.name} reads the teacher's generations"
            deps["texts"] = self.generations(family, teacher)
        select = select or self.select()
        inputs = {"objective": {"name": objective.name, "version": objective.version},
                  "sources": {name: self.registries.sources.get(name).version for name in plan.reads},
                  "params": dataclasses.asdict(params), "training": settings.model_dump(), "seed": seed,
                  "sample_max_new_tokens": self.experiment.teacher_generations.max_new_tokens
                  if plan.samples_student else None,
                  "selection": dataclasses.asdict(select)}
        return self.add(StageKind.TRAIN, label, inputs, deps, family,
                        TrainSpec(objective, params, settings, seed, select, plan))

    def sft_init(self, family: str, label: str, student: str, data: str, seed: int) -> str:
        """The SFT student other stages start from (one per student and training seed), kept by ``init.rule``;
        read from ``models.sft_inits`` when the experiment ships them (made by ``kdbench export-inits``)."""
        shipped = self.experiment.models.sft_inits.get(family)
        if shipped is not None:
            folder = Path(shipped) / label / f"seed{seed}"
            if not (folder / "config.json").is_file():
                made = sorted(p.name for p in (Path(shipped) / label).glob("seed*")) if Path(shipped).is_dir() else []
                raise KdbenchError(
                    f"models.sft_inits.{family} = {shipped} holds no SFT init of student {label} for training seed {seed} "
                    f"(expected the model folder {folder}; found {made or 'none'}). Run `kdbench export-inits --out "
                    f"{shipped}` with this experiment's seeds, or remove models.sft_inits.{family} to train the inits.")
            family_spec = self.registries.families.get(family)
            return self.checkpoint(family_spec, f"{label}/init/seed{seed}", str(folder))
        sft = self.registries.objectives.get("sft")
        return self.trained(family, f"{family}/{label}/init/seed{seed}", student, data, sft, sft.make_params({}),
                            self.experiment.init_training, seed,
                            select=self.select("loss", every=self.experiment.init_select_every,
                                               rule=self.experiment.init.rule))

    def starts_from_sft(self, objective: type[Objective], params: ObjectiveParams) -> bool:
        """uniform: every method starts where ``init.start`` says; paper: those whose recipe starts from the SFT student."""
        if self.experiment.protocol == "uniform":
            return self.experiment.init.start == "sft"
        return Need.SFT_INIT in objective.needs_for(params)

    def generations(self, family: str, teacher: str) -> str:
        settings = self.experiment.teacher_generations
        teacher_label = self.graph[teacher].label
        inputs = {"generation": settings.model_dump(), "data": self.data}
        return self.add(StageKind.GENERATE, teacher_label, inputs, {"teacher": teacher}, family, GenerateSpec(settings))

    def teacher_outputs(self, family: str, teacher: str, data: str) -> str:
        """The teacher's distributions on the tokenised training split ``data``, computed once for every stage that
        reads them. Keyed by what changes them: the teacher, the data, k, and the precision the teacher runs in."""
        inputs = {"top_k": self.experiment.teacher_outputs.top_k, "precision": self.experiment.training.precision}
        return self.add(StageKind.TEACHER_OUTPUTS, f"{self.graph[teacher].label}/outputs", inputs,
                        {"teacher": teacher, "data": data}, family)

    def cell(self, cell: Cell, model: str) -> str:
        evaluation = self.experiment.evaluation
        inputs = {"cell": {"family": cell.family, "student": cell.student, "method": cell.method, "seed": cell.seed,
                           "kind": cell.kind},
                  "evaluation": evaluation.model_dump(), "eval_seeds": cell.eval_seeds, "data": self.data,
                  "max_prompt_length": self.experiment.data.max_prompt_length}
        return self.add(StageKind.EVAL, cell.label, inputs, {"model": model}, cell.family, cell)

    def family(self, family: ModelFamily) -> None:
        """The teacher (SFT first when the experiment says so) and every student cell of one family."""
        experiment, selection = self.experiment, self.selection
        models = experiment.models
        teacher_label, student_labels = family.checkpoints(models.scale, models.students)
        # The model each (student, training seed) starts from: a pretrained checkpoint is the same for every
        # seed; a tiny student is initialised with the training seed, so seeds also vary the initialisation.
        if models.scale == "paper":
            overrides = models.student_paths.get(family.name, {})
            teacher_base = self.checkpoint(family, teacher_label, models.teachers.get(family.name, teacher_label))
            checkpoints = {label: self.checkpoint(family, label, overrides.get(label, name))
                           for label, name in student_labels.items()}
            students = {(label, seed): key for label, key in checkpoints.items() for seed in selection.seeds}
            tokenizers = {key: key for key in (teacher_base, *students.values())}  # each model's own tokenizer
        else:
            # A tiny teacher may be given as a model folder (the suite's shipped teachers), and so may the bases
            # (pretrained models): the students then take its tokenizer, so teacher and students index one
            # vocabulary by construction.
            shipped = models.teachers.get(family.name)
            tokenizer = self.tokenizer()
            if shipped:
                teacher_base = tokenizer = self.checkpoint(family, teacher_label, shipped)
            else:
                teacher_base = self.tiny_base(family, teacher_label, family.tiny_teacher, experiment.teacher.seed,
                                              tokenizer)
                if self.graph[teacher_base].kind is StageKind.CHECKPOINT:  # a shipped base carries its tokenizer
                    tokenizer = teacher_base
            # Without pretraining a tiny student is initialised with the training seed, so seeds also vary the
            # initialisation; a pretrained base is one per student, as GPT-2 base is for every seed of a paper.
            students = {(label, seed): self.tiny_base(family, label, family.tiny_students[label], seed, tokenizer)
                        for label in student_labels for seed in selection.seeds}
            # A model folder tokenises its own data (the vocabulary check holds it equal to the teacher's); a model
            # built here takes the tokenizer it was built with.
            tokenizers = {key: key if self.graph[key].kind is StageKind.CHECKPOINT else tokenizer
                          for key in (teacher_base, *students.values())}
        for student in dict.fromkeys(students.values()):  # checked before anything trains (kdbench.grid.execute)
            self.graph.same_vocabulary.append((teacher_base, student))

        sft = self.registries.objectives.get("sft")
        teacher = teacher_base
        if experiment.teacher.train:
            teacher = self.trained(family.name, f"{family.name}/{teacher_label}", teacher_base,
                                   self.tokenized(tokenizers[teacher_base], experiment.teacher.data), sft, sft.make_params({}),
                                   experiment.teacher_training, experiment.teacher.seed,
                                   select=self.select(selection=experiment.teacher.selection))
        base = {**self.shared, "family": family.name, "teacher": {"label": teacher_label, "key": teacher}}
        self.cell(Cell(family.name, teacher_label, TEACHER_METHOD, experiment.teacher.seed, "teacher",
                       {**base, "method": TEACHER_METHOD, "params": {}, "seed": experiment.teacher.seed},
                       selection.eval_seeds, teacher), teacher)

        for label in student_labels:
            for method in selection.methods:
                objective = self.registries.objectives.get(method)
                params = method_params(experiment, objective)
                for seed in selection.seeds:
                    student = students[label, seed]
                    data = self.tokenized(tokenizers[student])
                    init = self.sft_init(family.name, label, student, data, seed) if self.starts_from_sft(
                        objective, params) else student
                    # A shipped SFT init is the row's own starting point: it joins the seed's part of the config.
                    shipped = {"sft_init": init} if self.graph[init].kind is StageKind.CHECKPOINT and init != student else {}
                    if shipped and (teacher_base, init) not in self.graph.same_vocabulary:
                        self.graph.same_vocabulary.append((teacher_base, init))
                    cell = Cell(family.name, label, method, seed, "student",
                                {**base, "student": {"label": label, "key": student, **shipped}, "method": method,
                                 "params": dataclasses.asdict(params),
                                 "method_training": experiment.method_training.get(method, {}), "seed": seed},
                                selection.eval_seeds, teacher)
                    trained = self.trained(family.name, cell.label, init, data, objective, params,
                                           experiment.training_for(method), seed, teacher)
                    self.cell(cell, trained)


def collect(experiment: Experiment, registries: Registries, selection: Selection) -> StageGraph:
    """Every stage ``selection`` of ``experiment`` needs, with its key, in run order. Reads settings only:
    no weights, tokenizers or data are loaded, nothing is written."""
    collector = _Collector(experiment, registries, selection)
    for name in selection.families:
        collector.family(registries.families.get(name))
    collector.graph.drop_unneeded()
    return collector.graph
