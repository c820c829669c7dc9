"""What each kind of stage does, with the version of the code that does it.

A builder turns one node of the stage graph into its output: a cache entry (tokenizer, model init,
tokenised data, a trained model, stored generations) or, for a cell's evaluation, its result folder.
It reads its parents' outputs through the ``RunContext`` and never branches on an objective's name:
the objective and the sequence sources it reads declare what they need.

Bump a builder's ``version`` when what it produces changes: every node of that kind, and everything
downstream, gets a new key and is rebuilt; nothing else is.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdbench import distributed
from kdbench.config import config_hash
from kdbench.data import (
    TEMPLATE_PIECES,
    Record,
    TokenizedExample,
    format_prompt,
    prompt_fits,
    prompt_ids,
    tokenize_corpus,
    tokenize_records,
)
from kdbench.errors import KdbenchError
from kdbench.eval.evaluation import evaluate
from kdbench.grid.context import STATS_FILES, RunContext
from kdbench.grid.graph import Node, StageGraph, StageKind
from kdbench.objectives import Objective, ObjectiveParams
from kdbench.report.card import protocol_card
from kdbench.results import record, store
from kdbench.results.record import CellIdentity, stage_cost
from kdbench.results.schema import (
    SCHEMA_VERSION,
    CellExamples,
    CellResult,
    CodeVersions,
    ControlRecord,
    Cost,
    Failure,
    Status,
)
from kdbench.train.engine import Diverged, Tracking, TrainingData, Validation, train, validation_loss
from kdbench.train.generation import GREEDY, batch_progress, generate_responses
from kdbench.train.guards import PROBE_SIZE, checked_teacher, probe_batch
from kdbench.train.teacher_outputs import FILE as OUTPUTS_FILE
from kdbench.train.teacher_outputs import TeacherOutputs, compute_teacher_outputs, tail_mass
from kdbench.zoo import build_tiny_model, count_parameters, load_model, train_tokenizer

if TYPE_CHECKING:
    from kdbench.grid.specs import Cell, GenerateSpec, InitSpec, SelectSpec, TrainSpec

LM_EVAL_SEED = "lm-eval"  # the eval-seed label of lm-eval scores (lm-eval decodes greedily, once)


@dataclass(frozen=True)
class Builder:
    """How one kind of node is built into ``folder``: its cache entry, or for a cell its result folder (a
    checkpoint has nothing to build). ``collective`` stages are built by every process of a launch
    (training, sharded generation, evaluation); the main process alone builds the others."""

    kind: StageKind
    version: int
    build: Callable[[Node, RunContext, Path], None]
    collective: bool = False


# -- builders --------------------------------------------------------------------------------------

def build_tokenizer(node: Node, context: RunContext, folder: Path) -> None:
    texts: Iterable[str] = (format_prompt(r) + r["response"] for r in context.train_records())
    if "corpus" in node.inputs:
        texts = itertools.chain(corpus_text(context, node.inputs["corpus"]), texts)
    train_tokenizer(texts, node.inputs["vocab_size"], folder, TEMPLATE_PIECES)


def corpus_text(context: RunContext, corpus: dict[str, Any]) -> list[str]:
    """The documents of a plain-text corpus named in a node's inputs (``dataset``, ``options``)."""
    spec = context.registries.datasets.get(corpus["dataset"])
    if spec.corpus is None:
        raise KdbenchError(f"dataset {corpus['dataset']!r} has no plain-text corpus; expected a dataset that provides "
                           "one (tiny, openwebtext).")
    return spec.corpus(dict(corpus["options"]))


def build_init(node: Node, context: RunContext, folder: Path) -> None:
    spec: InitSpec = node.spec
    tokenizer = context.tokenizer(node.deps["tokenizer"])
    build_tiny_model(spec.family, spec.arch, tokenizer, context.experiment.data.max_length, spec.seed, folder)


def write_examples(folder: Path, split: str, examples: list[TokenizedExample]) -> None:
    (folder / f"{split}.json").write_text(json.dumps([dataclasses.asdict(e) for e in examples]))


def build_tokenize(node: Node, context: RunContext, folder: Path) -> None:
    """An instruction set's training and validation splits (``data``), or a pretraining corpus (``corpus``: its
    chunks, the last ``validation_chunks`` held out as the validation split)."""
    data = context.experiment.data
    tokenizer = context.tokenizer(node.deps["tokenizer"])
    if "corpus" in node.inputs:
        corpus = node.inputs["corpus"]
        chunks = tokenize_corpus(corpus_text(context, corpus), tokenizer, data.max_length, corpus["max_chunks"])
        held_out = node.inputs["validation_chunks"]
        if len(chunks) <= held_out:
            raise KdbenchError(f"the pretraining corpus {corpus['dataset']!r} gave {len(chunks)} chunks of "
                               f"data.max_length={data.max_length} tokens, not more than pretrain.validation_chunks="
                               f"{held_out}; expected more text, or fewer held-out chunks.")
        write_examples(folder, "train", chunks[:-held_out])
        write_examples(folder, "validation", chunks[-held_out:])
        return
    source = node.inputs["data"]
    splits = context.splits(source["dataset"], source["options"])
    for split in ("train", "validation"):  # validation: the loss an SFT init is selected on
        examples = tokenize_records(splits[split], tokenizer, data.max_length, data.max_prompt_length)
        if not examples:
            raise KdbenchError(prompts_too_long(splits[split], tokenizer, source["dataset"], split,
                                                data.max_prompt_length, data.max_length))
        context.note_dropped(node.family, source["dataset"], source["options"], split, len(splits[split]), len(examples))
        write_examples(folder, split, examples)
    evaluated = context.splits(data.dataset, data.options)[context.experiment.evaluation.split]
    # Refused now rather than after every cell has trained.
    if evaluated and not any(prompt_fits(r, tokenizer, data.max_prompt_length) for r in evaluated):
        raise KdbenchError(prompts_too_long(evaluated, tokenizer, data.dataset, context.experiment.evaluation.split,
                                            data.max_prompt_length, data.max_length))
    if context.experiment.lm_data is not None:  # the pre-training LM term's text, packed into max_length chunks
        lm_data = context.experiment.lm_data
        text = corpus_text(context, {"dataset": lm_data.dataset, "options": lm_data.options})
        chunks = tokenize_corpus(text, tokenizer, data.max_length, lm_data.max_chunks)
        if not chunks:
            raise KdbenchError(f"lm_data {lm_data.dataset!r} gave no chunk of data.max_length={data.max_length} tokens.")
        write_examples(folder, "lm", chunks)


def prompts_too_long(records: list[Record], tokenizer: Any, dataset: str, split: str, max_prompt_length: int,
                     max_length: int) -> str:
    """The message for a split none of whose prompts fits ``data.max_prompt_length`` (or that is empty)."""
    if not records:
        return f"the {split} split of dataset {dataset!r} holds no record; expected at least one. Check its files or options."
    shortest = min(len(prompt_ids(r, tokenizer)) for r in records)
    return (f"all {len(records)} {split} prompts of dataset {dataset!r} are longer than data.max_prompt_length="
            f"{max_prompt_length} tokens (the shortest has {shortest}), and longer prompts are dropped; expected at "
            f"least one that fits. Raise data.max_prompt_length to {shortest} or more (and data.max_length above it, "
            f"now {max_length}), or shorten the prompts.")


def build_generations(node: Node, context: RunContext, folder: Path) -> None:
    """One sampled teacher response per training prompt, split over the processes of a launch."""
    spec: GenerateSpec = node.spec
    settings = spec.settings
    teacher = context.frozen(node.deps["teacher"])
    tokenizer = context.tokenizer(node.deps["teacher"])
    records = context.train_records()
    data = context.experiment.data  # samples of a uniform or broken teacher would train students on noise
    probe = probe_batch(*(tokenize_records(split, tokenizer, data.max_length, data.max_prompt_length) for split in
                          (context.splits(data.dataset, data.options)["validation"], records[:PROBE_SIZE])))
    if probe:
        checked_teacher(teacher, probe, tokenizer.pad_token_id, context.graph[node.deps["teacher"]].label,
                        f"{node.label}: generate")
    advance = batch_progress(context.hook, f"{node.label}: generate",
                             -(-distributed.shard_size(len(records)) // settings.batch_size))
    responses = distributed.map_sharded(records, lambda share: generate_responses(
        teacher, tokenizer, share, str(settings.seed), settings.max_new_tokens, settings.batch_size, advance))
    (folder / "generations.json").write_text(json.dumps(responses))


def build_teacher_outputs(node: Node, context: RunContext, folder: Path) -> None:
    """The teacher's distributions at every loss position of the tokenised training split, exact or top-k
    (``kdbench.train.teacher_outputs``), with what it cost in ``stats.json``: an ancestor of every cell reading it."""
    settings = context.experiment.teacher_outputs
    teacher_key = node.deps["teacher"]
    teacher = context.frozen(teacher_key)
    tokenizer = context.tokenizer(teacher_key)
    examples = context.tokenized(node.deps["data"])
    probe = checked_teacher(teacher, probe_batch(context.tokenized(node.deps["data"], "validation"), examples),
                            tokenizer.pad_token_id, context.graph[teacher_key].label, f"{node.label}: teacher_outputs")
    started = time.perf_counter()
    batches = -(-len(examples) // settings.batch_size)
    advance = batch_progress(context.hook, f"{node.label}: teacher_outputs", batches)
    outputs = compute_teacher_outputs(teacher, examples, tokenizer.pad_token_id, settings.top_k, settings.batch_size,
                                      context.device, advance)
    outputs.save(folder)
    stats = {"steps": 0, "examples": len(examples), "tokens": 0, "seconds": time.perf_counter() - started,
             "teacher_forwards": batches, "positions": int(outputs.logprobs.shape[0]), "top_k": outputs.top_k,
             "bytes": outputs.nbytes(), "tail_mass": tail_mass(outputs), "teacher_probe": probe.as_dict()}
    (folder / STATS_FILES[StageKind.TEACHER_OUTPUTS]).write_text(json.dumps(stats))


def resume_folder(context: RunContext, node: Node) -> Path:
    """Where a training stage keeps its resume checkpoint, ``<cache>/.resume/train/<key>``: named by the stage's key,
    so the next worker to build the key (whichever holds its lock) continues it; outside the staging folder, which
    is named by process and discarded with it; outside ``<cache>/train/``, whose folders are entries or staging."""
    return context.cache.root / ".resume" / node.kind.value / node.key


def build_training(node: Node, context: RunContext, folder: Path) -> None:
    """Provide what the objective and its sources declared (teacher, stored generations or outputs), then train, continuing
    from the stage's resume checkpoint when a killed run left one."""
    spec: TrainSpec = node.spec
    init = node.deps["init"]
    tokenizer = context.tokenizer(init)
    texts = context.teacher_texts(node.deps["texts"], tokenizer) if "texts" in node.deps else None
    teacher = context.frozen(node.deps["teacher"]) if "teacher" in node.deps else None
    lm_text = context.tokenized(node.deps["data"], "lm") if spec.settings.lm_coef > 0 else None
    outputs = (context.read(node.deps["outputs"], OUTPUTS_FILE, lambda path: TeacherOutputs.load(Path(path)))
               if "outputs" in node.deps else None)
    data = TrainingData(context.tokenized(node.deps["data"]), tokenizer.pad_token_id, tokenizer.eos_token_id, texts,
                        context.experiment.teacher_generations.max_new_tokens, lm_text, outputs)
    probe = None if teacher is None else checked_teacher(  # a uniform or broken teacher fails the stage before step 1
        teacher, probe_batch(context.tokenized(node.deps["data"], "validation"), data.examples), tokenizer.pad_token_id,
        context.graph[node.deps["teacher"]].label, f"{node.label}: train")
    _, stats = train(lambda: context.read(init, "the model", load_model), spec.objective, spec.params, data,
                     spec.settings, spec.seed, teacher,
                     sources=context.registries.sources, plan=spec.plan, observer=context.hook, stage=f"{node.label}: train",
                     tracking=tracking(context, node.label, spec.objective, spec.params, spec.settings),
                     save_to=folder, tokenizer=tokenizer, validation=validation(node, context, tokenizer),
                     resume_dir=resume_folder(context, node), checkpoint_every=context.experiment.checkpoint_every)
    payload = {**dataclasses.asdict(stats), "selection": dataclasses.asdict(spec.select)}
    if probe is not None:
        payload["teacher_probe"] = probe.as_dict()
    log = payload.pop("log")
    (folder / STATS_FILES[StageKind.TRAIN]).write_text(json.dumps(payload))
    (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


def discard_resume_checkpoint(context: RunContext, node: Node) -> None:
    """Delete a training stage's resume checkpoint once its entry is published (every process has seen it): a kill
    at any moment before then finds the checkpoint and continues from it, not from step 0."""
    if distributed.is_main():
        shutil.rmtree(resume_folder(context, node), ignore_errors=True)


def validation(node: Node, context: RunContext, tokenizer: Any) -> Validation:
    """How a training stage is scored on the validation split for checkpoint selection: the mean token loss on
    the gold responses, or a metric of greedy (or once-sampled) generations."""
    select: SelectSpec = node.spec.select
    batch_size = context.experiment.evaluation.batch_size
    if select.metric == "loss":
        examples = context.tokenized(node.deps["data"], "validation")[: select.max_examples]
        return Validation(lambda model: validation_loss(model, examples, tokenizer.pad_token_id, batch_size),
                          select.every, higher_is_better=False, keep_best=select.keep_best)
    records = context.eval_records(tokenizer, node.family, validation=True)[: select.max_examples]
    metric = context.registries.metrics.get(select.metric)
    seed = GREEDY if select.greedy else "0"

    def score(model: torch.nn.Module) -> float:
        scores = evaluate(model, tokenizer, records, [metric], [seed], select.max_new_tokens, batch_size)
        return scores["metrics"][metric.name][seed]

    return Validation(score, select.every, metric.higher_is_better, select.keep_best)


def tracking(context: RunContext, label: str, objective: type[Objective], params: ObjectiveParams,
             settings: Any) -> Tracking | None:
    """Where the experiment's trackers log a training stage: ``<out>/tracking/<label>``."""
    if not context.experiment.trackers:
        return None
    flat = {"objective": objective.name, **{f"params.{k}": v for k, v in dataclasses.asdict(params).items()},
            **{f"training.{k}": v for k, v in settings.model_dump().items()}}
    scalars = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
    return Tracking(tuple(context.experiment.trackers), str(context.out_dir / "tracking"), label, scalars)


def build_cell(node: Node, context: RunContext, folder: Path) -> None:
    """Evaluate the cell's model on every evaluation set and write its folder; ``result.json`` goes last."""
    cell: Cell = node.spec
    started = time.perf_counter()
    evaluation = context.experiment.evaluation
    model_key = node.deps["model"]
    model_path = context.path(model_key)
    tokenizer = context.tokenizer(model_key)
    network = context.frozen(model_key)
    records = context.eval_records(tokenizer, cell.family)
    scores = evaluate(network, tokenizer, records, context.metrics, cell.eval_seeds, evaluation.max_new_tokens,
                      evaluation.batch_size, context.hook, f"{cell.label}: eval")
    eval_examples = {"": len(records)}
    example_sets = {"": scores["examples"]}
    for label, extra in evaluation.datasets.items():  # extra sets: "<label>/<metric>" columns
        extra_records = context.eval_records(tokenizer, cell.family, extra)
        extra_scores = evaluate(network, tokenizer, extra_records, context.metrics, cell.eval_seeds,
                                evaluation.max_new_tokens, evaluation.batch_size, context.hook,
                                f"{cell.label}: eval {label}")
        scores["metrics"].update({f"{label}/{name}": v for name, v in extra_scores["metrics"].items()})
        scores["per_task"].update({f"{label}/{seed}": v for seed, v in extra_scores["per_task"].items()})
        scores["seconds"] += extra_scores["seconds"]
        eval_examples[label] = len(extra_records)
        example_sets[label] = extra_scores["examples"]
    higher_is_better = {name: m.higher_is_better for name in scores["metrics"] for m in context.metrics
                        if name.rsplit("/", 1)[-1] == m.name}
    if evaluation.lm_eval.tasks:
        scores["seconds"] += score_lm_eval(context, network, tokenizer, records, scores["metrics"], higher_is_better)
    teacher_params = context.model_parameters(cell.teacher)
    params = ({"teacher": teacher_params} if cell.kind == "teacher"
              else {"student": count_parameters(network), "teacher": teacher_params})
    result = record.scored(
        cell_identity(context, node), metrics=scores["metrics"], higher_is_better=higher_is_better,
        per_task=scores["per_task"], eval_examples=eval_examples, eval_seconds=scores["seconds"],
        this_run_seconds=time.perf_counter() - started,
        train_stats=context.train_stats.get(model_key, {}),  # the stage that made the model; none for a teacher
        cost=cell_cost(context, node), params=params)
    if distributed.is_main():
        store.atomic_write_json(folder / "config.json", cell.config)
        store.atomic_write_json(folder / "samples.json", scores["samples"])
        examples: CellExamples = {"schema_version": SCHEMA_VERSION, "sets": example_sets}
        store.atomic_write_json(folder / "examples.json", examples, compact=True)
        train_log = Path(model_path) / "train_log.jsonl"
        if train_log.is_file():
            store.atomic_write_text(folder / "train_log.jsonl", train_log.read_text())
        store.atomic_write_json(folder / "result.json", result)  # last: marks the cell finished
    distributed.barrier()  # every process sees the finished cell before any moves on
    context.hook.kdbench_on_cell_end(cell=cell.label, result=result)


def score_lm_eval(context: RunContext, model: Any, tokenizer: Any, heldout: list[Record],
                  metrics: dict[str, dict[str, float]], higher_is_better: dict[str, bool]) -> float:
    """lm-eval tasks on the in-memory model, added to ``metrics`` as ``lm_eval/<task>/<metric>``; returns
    the seconds taken. lm-eval runs an in-memory model in one process, so the main process scores it."""
    from kdbench.eval.lmeval import lm_eval_scores

    started = time.perf_counter()
    if distributed.is_main():
        # A folder of this process's own: workers scoring cells on one cache at once would otherwise rewrite the
        # task files (and clear the datasets cache) under each other's lm-eval. It is only scratch: the scores are
        # kept in the cell's result. A cache shared read-only holds no scratch: the system's temporary folder does.
        scratch = context.cache.root if os.access(context.cache.root, os.W_OK) else Path(tempfile.gettempdir()) / "kdbench"
        work_dir = (scratch / "lm_eval" / config_hash([format_prompt(r) for r in heldout])
                    / f"{store.host()}-{os.getpid()}")
        try:
            scores = lm_eval_scores(model, tokenizer, context.experiment.evaluation.lm_eval, heldout, work_dir)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        for name, value in scores.values.items():
            metrics[f"lm_eval/{name}"] = {LM_EVAL_SEED: value}
            higher_is_better[f"lm_eval/{name}"] = scores.higher_is_better[name]
    return time.perf_counter() - started


def cell_cost(context: RunContext, node: Node) -> Cost:
    """The cell's own training stage and every costed stage before it (SFT init, teacher, stored teacher outputs),
    each by label, and their sum: what it took, from the base models, to produce the row (a base's pretraining is
    not counted, as a paper-scale checkpoint's is not)."""
    own_key = node.deps["model"]
    ancestors = [key for key in context.graph.costed_lineage(own_key) if key != own_key and key in context.train_stats]
    own = stage_cost(context.train_stats.get(own_key, {}))
    before = {context.graph[key].label: stage_cost(context.train_stats[key]) for key in ancestors}
    total = {field: sum(c[field] for c in (own, *before.values())) for field in own}
    return {"own": own, "ancestors": before, "total": total}  # type: ignore[typeddict-item]


# -- results ---------------------------------------------------------------------------------------

def code_versions(graph: StageGraph, key: str) -> CodeVersions:
    """The versions of every builder, objective and source the cell at ``key`` was built with."""
    lineage = [graph[k] for k in graph.lineage(key)]
    trainings = [node for node in lineage if node.kind is StageKind.TRAIN]
    return {"stages": {node.kind.value: node.version for node in lineage},
            "objectives": {n.inputs["objective"]["name"]: n.inputs["objective"]["version"] for n in trainings},
            "sources": {name: version for n in trainings for name, version in n.inputs["sources"].items()},
            "libraries": store.library_versions()}


def cell_identity(context: RunContext, node: Node) -> CellIdentity:
    cell: Cell = node.spec
    graph = context.graph
    return CellIdentity(
        experiment=context.experiment.name, key=node.key, lineage=graph.lineage(node.key),
        versions=code_versions(graph, node.key), config_hash=config_hash(cell.config),
        shared_config_hash=cell.shared_hash, family=cell.family, student=cell.student, method=cell.method,
        kind="teacher" if cell.kind == "teacher" else "student", train_seed=cell.seed,
        primary_metric=context.experiment.evaluation.primary, protocol=context.experiment.protocol,
        protocol_card=protocol_card(context.experiment, sorted({n.spec.seed for n in graph.cells()
                                                                if n.spec.kind == "student"})),
        # In no key, so a changed control re-runs nothing.
        controls=[ControlRecord(task=c.task, better=c.better, worse=c.worse, mechanism=c.mechanism, source=c.source)
                  for c in context.experiment.controls],
        processes=distributed.world_size())


def failure_of(node: Node, error: BaseException) -> tuple[Status, Failure]:
    """How a stage that raised ``error`` is reported: ``diverged`` with its step, or ``failed``."""
    stage = f"{node.label}: {node.kind.value}"
    if isinstance(error, Diverged):
        return "diverged", {"reason": str(error), "stage": stage, "stage_key": node.key, "step": error.step}
    frames = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-6:])
    if isinstance(error, OSError) and error.filename and not isinstance(error, store.StorageFull):
        error = store.storage_full(error, Path(error.filename))  # a full disk: which folder, and how much is free
    return "failed", {"reason": f"{type(error).__name__}: {error}".splitlines()[0][:500], "stage": stage,
                      "stage_key": node.key, "step": None, "traceback": frames[-4000:]}


def write_unscored_cell(context: RunContext, node: Node, status: Status, failure: Failure) -> CellResult:
    """A cell that could not be scored: its result says why, and its report row shows it."""
    cell: Cell = node.spec
    result = record.new_result(cell_identity(context, node), status, failure)
    folder = store.cell_dir(context.out_dir, cell.family, cell.student, cell.method, cell.seed)
    if distributed.is_main():
        store.atomic_write_json(folder / "config.json", cell.config)
        store.atomic_write_json(folder / "result.json", result)
    distributed.barrier()
    context.hook.kdbench_on_cell_end(cell=cell.label, result=result)
    return result


BUILDERS: dict[StageKind, Builder] = {builder.kind: builder for builder in (
    Builder(StageKind.CHECKPOINT, 1, lambda node, context, folder: None),
    Builder(StageKind.TOKENIZER, 1, build_tokenizer),
    Builder(StageKind.INIT, 1, build_init),
    Builder(StageKind.TOKENIZE, 2, build_tokenize),
    Builder(StageKind.TRAIN, 2, build_training, collective=True),
    Builder(StageKind.GENERATE, 1, build_generations, collective=True),
    Builder(StageKind.TEACHER_OUTPUTS, 1, build_teacher_outputs),
    Builder(StageKind.EVAL, 3, build_cell, collective=True),  # 3: writes examples.json
)}
