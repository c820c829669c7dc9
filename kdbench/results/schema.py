"""The shape of ``result.json`` and ``examples.json``: one cell's outcome, written by the executor, read by
``kdbench report``.

Every cell of a run writes a ``result.json`` (``CellResult``), whether it finished (``status: ok``) or not
(``failed``, ``diverged``): a leaderboard shows the rows that could not be scored with their reason rather than
dropping them. A scored cell also writes ``examples.json`` (``CellExamples``) beside it: every evaluation
example's score per metric and evaluation seed, and the facts the report groups examples by (task, gold length),
from which it computes paired significance tests and length buckets. Modelled on lm-evaluation-harness's
``result_schema.py``: TypedDicts with a comment on every key, and one version, bumped whenever a key changes
meaning or disappears (4: ``examples.json`` added).
"""

from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

# typing_extensions' TypedDict sees NotRequired on every Python kdbench supports (typing's does from 3.11).
from typing_extensions import NotRequired, TypedDict

from kdbench.errors import KdbenchError

# The one schema version: kdbench writes it, ``kdbench report`` reads only it.
SCHEMA_VERSION = 4

Status = Literal["ok", "failed", "diverged"]
STATUSES: tuple[Status, ...] = ("ok", "failed", "diverged")


class Failure(TypedDict):
    """Why a cell has no scores."""

    reason: str  # one line: the exception, or the non-finite loss and the step it appeared at
    stage: str  # label of the stage that failed, "gpt2/s1/kd/seed0: train"; an ancestor's when the cell was skipped
    stage_key: str  # that stage's key in the stage graph
    step: int | None  # optimizer step of a diverged training stage; None otherwise
    traceback: NotRequired[str]  # the Python traceback of a failed stage (last frames)


class CodeVersions(TypedDict):
    """Versions of the code the cell was built with; bumping one re-runs exactly the cells it reaches."""

    stages: dict[str, int]  # stage kind → version of its builder, over the cell's lineage
    objectives: dict[str, int]  # objective name → version, over the lineage's training stages
    sources: dict[str, int]  # sequence source name → version, over the lineage's training stages
    libraries: dict[str, str]  # kdbench, torch, transformers, accelerate, deepspeed, python


class WallSeconds(TypedDict):
    train: float  # the cell's own training stage (0 for the teacher row when its SFT was cached elsewhere)
    eval: float  # generation and scoring, every evaluation set and lm-eval included
    total: float  # train + eval
    this_run: float  # what this invocation spent on the cell (0 s of training when it came from the cache)


class Tokens(TypedDict):
    train: int  # non-padding tokens the student read during its own training stage, all processes
    response: int  # gold response tokens the loss was taken on, all processes


class StageCost(TypedDict):
    optimizer_steps: int
    examples: int  # training sequences drawn (prompts of rollouts for on-policy stages), all processes
    tokens: int  # non-padding tokens of those sequences
    seconds: float  # wall time of the stage when it was built


class Cost(TypedDict):
    """What producing the row took, from the base models: its own training stage and every one before it."""

    own: StageCost  # the cell's own stage: under protocol uniform, equal across a leaderboard's student rows
    ancestors: dict[str, StageCost]  # stage label ("gpt2/s1/init/seed0", "gpt2/teacher") → its cost
    total: StageCost  # own + ancestors


class Validation(TypedDict):
    metric: str | None  # "loss" or an evaluation metric; None when the cell's model was not trained here
    curve: list[dict[str, float]]  # {"step", "value"} at every validation of the cell's own stage


class ForwardPasses(TypedDict):
    student: int  # student forward passes with gradients during its own training stage (per micro-batch, per sequence)
    teacher: int  # teacher forward passes under teacher forcing during that stage


class ControlRecord(TypedDict):
    """A positive control as the experiment declared it (kdbench.config.ControlConfig)."""

    task: str  # the task label the difference is predicted on
    better: str  # the method predicted to score higher there
    worse: str  # the method predicted to score lower
    mechanism: str  # why, in a sentence
    source: str  # the paper it comes from ("" when not given)


class CellResult(TypedDict):
    """``<out>/cells/<family>/<student>/<method>/seed<k>/result.json``."""

    schema_version: int  # SCHEMA_VERSION of the kdbench that wrote it
    status: Status  # ok: scored; failed: a stage raised; diverged: a training loss became non-finite
    failure: NotRequired[Failure]  # present exactly when status is not ok
    experiment: str  # the experiment's name
    key: str  # key of the cell's evaluation stage: the cell is finished when a result with this key and status ok exists
    lineage: list[str]  # keys of every stage the cell was built from, its own included, in run order
    versions: CodeVersions
    config_hash: str  # hash of the cell's resolved settings (config.json)
    shared_config_hash: str  # hash of the settings every cell it is compared with shares (all but the method's own)
    family: str  # model family, "gpt2"
    student: str  # student label ("s1", "120M"); the teacher's label on the teacher row
    method: str  # objective name; "teacher" on the teacher row
    kind: Literal["student", "teacher"]
    train_seed: int
    primary_metric: str  # the metric leaderboards rank by: the experiment's evaluation.primary_metric
    metrics: dict[str, dict[str, float]]  # metric → evaluation seed ("10", "greedy", "lm-eval") → score; {} unless ok
    higher_is_better: dict[str, bool]  # metric → direction
    per_task: dict[str, dict[str, dict[str, float]]]  # evaluation seed → task → metric → score
    eval_examples: int  # examples scored on the experiment's own evaluation split
    eval_examples_by_dataset: dict[str, int]  # "" (own split) or the extra set's label → examples scored
    wall_seconds: WallSeconds
    protocol: Literal["uniform", "paper"]  # the experiment's protocol (docs/protocols.md)
    protocol_card: dict[str, str]  # kdbench.report.card: init, budget, LM term, selection, seeds, evaluation in words
    tokens: Tokens
    optimizer_steps: int  # of the cell's own training stage
    optimizer_steps_total: int  # own + every training stage before it (SFT init, teacher)
    cost: Cost
    selected_step: int  # the optimizer step of the own stage whose weights were scored (selection rule)
    validation: Validation  # the curve the own stage was selected on
    processes: int  # data-parallel processes that trained and evaluated it
    forward_passes: ForwardPasses
    params: dict[str, int]  # "student" and "teacher" → parameter count (the teacher row: "teacher" only)
    peak_memory_mb: float  # peak resident memory of the process (CPU), or peak CUDA allocation
    finished_at: str  # ISO 8601, UTC
    # The experiment's positive controls, so that a report built from result files alone can test them; absent in
    # results written before controls existed (read as none). In no key: a cell does not re-run when they change.
    controls: NotRequired[list[ControlRecord]]


REQUIRED_KEYS: tuple[str, ...] = tuple(
    key for key in CellResult.__annotations__ if key not in CellResult.__optional_keys__)


class ExampleSet(TypedDict):
    """One evaluation set's examples, in the order they were scored: every list has one entry per example."""

    fingerprint: str  # hash of the examples' prompts and references: rows pair example by example only when equal
    task: list[str]  # the record's task ("" when the data names none)
    gold_words: list[int]  # words (whitespace-separated) in the gold response
    dataset: NotRequired[list[str]]  # the record's dataset name, present when the records name one
    scores: dict[str, dict[str, list[float]]]  # metric → evaluation seed → per-example score ×100, 4 decimals
    # (a whole number written as an integer: exact match's 0 and 100); the set's mean is result.json's metric


class CellExamples(TypedDict):
    """``<out>/cells/<family>/<student>/<method>/seed<k>/examples.json``, written with a scored ``result.json``."""

    schema_version: int  # SCHEMA_VERSION of the kdbench that wrote it
    sets: dict[str, ExampleSet]  # "" (the experiment's own evaluation split) or an extra set's label → its examples


_RESULT = TypeAdapter(CellResult)
_EXAMPLES = TypeAdapter(CellExamples)


def _checked(adapter: TypeAdapter[Any], payload: Any, where: str, what: str) -> Any:
    try:
        adapter.validate_python(payload)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in error.errors()[:5])
        raise KdbenchError(f"{where} is not a valid {what} ({error.error_count()} problem(s): {problems}); expected "
                           f"the shape of kdbench.results.schema.{what}. `kdbench run` with the same experiment re-runs "
                           "that cell.") from None
    return payload


def check_result(payload: Any, where: str) -> CellResult:
    """``payload`` itself when it has every key of ``CellResult`` with the right types; else KdbenchError naming
    ``where`` and the first problems."""
    return _checked(_RESULT, payload, where, "CellResult")


def check_examples(payload: Any, where: str) -> CellExamples:
    """``payload`` itself when it is a ``CellExamples`` whose lists all have one entry per example."""
    examples: CellExamples = _checked(_EXAMPLES, payload, where, "CellExamples")
    for label, example_set in examples["sets"].items():
        count = len(example_set["task"])
        lists = [example_set["gold_words"], example_set.get("dataset", example_set["task"]),
                 *(values for by_seed in example_set["scores"].values() for values in by_seed.values())]
        wrong = sorted({len(values) for values in lists if len(values) != count})
        if wrong:
            raise KdbenchError(f"{where}: set {label!r} has {count} examples but lists of {wrong} entries; expected "
                               "one entry per example in every list. `kdbench run` with the same experiment re-runs that cell.")
    return examples
