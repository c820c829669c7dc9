"""lm-evaluation-harness scores of an in-memory model.

Any lm-eval task can be named in ``evaluation.lm_eval.tasks``; it keeps lm-eval's own metrics and
scale. ``kdbench_heldout`` is the experiment's own evaluation split written out as a local lm-eval
generation task: the same prompts (``format_prompt``), greedy decoding cut at EOS, and kdbench's
ROUGE-L and exact match (×100), so its numbers can be checked against kdbench's greedy evaluation.

lm-eval is an optional dependency (``pip install 'kdbench[lm-eval]'``): it is imported only here,
and only when a task is asked for.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import random
import shutil
import sys
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdbench.config import LmEvalConfig
from kdbench.data import Record, format_prompt
from kdbench.errors import KdbenchError
from kdbench.eval.scoring import exact_match, rouge_l

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel

HELDOUT_TASK = "kdbench_heldout"
HELDOUT_METRICS = ("rougeL", "exact_match")
_FUNCTIONS_MODULE = "kdbench_heldout_functions"  # the module the YAML's !function entries name
_INSTALL_HINT = "pip install 'kdbench[lm-eval]'"


# ---------------------------------------------------------------------------- the kdbench_heldout task
# lm-eval calls these through the module written next to the task YAML (see write_heldout_task).


def doc_to_text(doc: Record) -> str:
    """The prompt of a heldout document: exactly kdbench's own evaluation prompt."""
    return format_prompt(doc)


def process_results(doc: Record, results: Sequence[str]) -> dict[str, float]:
    """kdbench's per-example scores of one generation, ×100 like kdbench's corpus scores (lm-eval
    averages them). The strip mirrors ``generate_responses``, which strips every decoded response."""
    prediction = results[0].strip()
    references = doc["references"]
    return {"rougeL": 100.0 * rouge_l(prediction, references),
            "exact_match": 100.0 * exact_match(prediction, references)}


def _heldout_yaml(data_file: Path, cache_dir: Path, max_new_tokens: int) -> str:
    # Written by hand: a YAML dumper cannot emit lm-eval's !function tag. json.dumps quotes paths.
    metrics = "\n".join(f"  - {{metric: {name}, aggregation: mean, higher_is_better: true}}" for name in HELDOUT_METRICS)
    return f"""\
# Written by kdbench.eval.lmeval: the experiment's evaluation records as an lm-eval generation task.
task: {HELDOUT_TASK}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {json.dumps(str(data_file))}}}
  cache_dir: {json.dumps(str(cache_dir))}
test_split: test
output_type: generate_until
num_fewshot: 0  # zero-shot like kdbench's own evaluation; lm-eval never overrides an explicit 0
doc_to_text: !function {_FUNCTIONS_MODULE}.doc_to_text
doc_to_target: response
process_results: !function {_FUNCTIONS_MODULE}.process_results
generation_kwargs:
  until: []  # HFLM always adds the tokenizer's EOS; no other stop string, as in kdbench
  do_sample: false
  max_gen_toks: {max_new_tokens}
metric_list:
{metrics}
metadata:
  version: 1.0
"""


def write_heldout_task(records: Sequence[Record], folder: Path, max_new_tokens: int) -> Path:
    """Write the experiment's evaluation records as a local lm-eval task (named HELDOUT_TASK) into folder:
    a JSONL data file (absolute path in the YAML), the task YAML, and whatever python module the YAML's
    !function entries need. Returns the folder to pass as an include path."""
    if not records:
        raise KdbenchError(f"{HELDOUT_TASK} needs at least one evaluation record; the evaluation split is empty.")
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / f"{HELDOUT_TASK}.jsonl"
    with data_file.open("w", encoding="utf-8") as handle:
        for record in records:
            # Only the fields the task reads, with fixed types, so the JSON loader infers one schema.
            doc = {"instruction": record["instruction"], "context": str(record.get("context") or ""),
                   "response": record["response"], "references": list(record["references"]),
                   "task": str(record.get("task") or "")}
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    # `datasets` keys its cache on the data file's path and mtime; a fresh cache folder per write
    # means a rewritten file can never be served from an old Arrow copy.
    cache_dir = folder / "hf_datasets_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    # lm-eval resolves `!function module.fn` to a .py file beside the YAML; this one only forwards to
    # kdbench, so the logic stays in the package and works from any working directory.
    (folder / f"{_FUNCTIONS_MODULE}.py").write_text(
        '"""Written by kdbench.eval.lmeval: the functions the kdbench_heldout task YAML names."""\n\n'
        "from kdbench.eval.lmeval import doc_to_text, process_results  # noqa: F401\n",
        encoding="utf-8",
    )
    (folder / f"{HELDOUT_TASK}.yaml").write_text(_heldout_yaml(data_file, cache_dir, max_new_tokens), encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------- scoring


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise KdbenchError(
            f"evaluation.lm_eval.tasks needs the lm-eval package, which could not be imported ({error}). "
            f"Install it with {_INSTALL_HINT}, or leave evaluation.lm_eval.tasks empty."
        ) from None


@contextlib.contextmanager
def _quiet_and_isolated(model: torch.nn.Module) -> Iterator[None]:
    """Run lm-eval without its chatter and without side effects on the caller.

    lm-eval logs at INFO/WARNING and draws tqdm bars whose on/off switch is read from the environment
    at import time, so the bars are caught by a stderr buffer (replayed if lm-eval crashes). It also
    reseeds python, numpy and torch, and HFLM switches the model to eval mode: all restored here.
    """
    import datasets.utils.logging as datasets_logging

    lm_eval_logger = logging.getLogger("lm_eval")
    old_level, was_training = lm_eval_logger.level, model.training
    bars_were_on = datasets_logging.is_progress_bar_enabled()
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    lm_eval_logger.setLevel(logging.ERROR)
    datasets_logging.disable_progress_bar()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except Exception as error:
        if not isinstance(error, KdbenchError):  # a crash inside lm-eval: show what it printed
            sys.stderr.write(captured.getvalue())
        raise
    finally:
        lm_eval_logger.setLevel(old_level)
        if bars_were_on:
            datasets_logging.enable_progress_bar()
        model.train(was_training)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


def _heldout_token_budget(lm: HFLM, records: Sequence[Record], max_new_tokens: int) -> int:
    """``max_new_tokens``, capped so that the longest prompt plus the answer fit the model's positions.

    HFLM keeps only the last ``max_length - max_gen_toks`` prompt tokens (left truncation) and asserts
    that difference is positive: with ``max_gen_toks`` at most ``max_length - longest prompt`` no prompt
    loses a token and no generation runs past the learned positions (GPT-2 tiny: 64).
    kdbench's own ``generate_responses`` caps per batch (positions − that batch's width), so the two
    differ only for answers that run into the cap without emitting EOS.
    """
    prompts = [format_prompt(r) for r in records]
    longest = int(lm.tok_batch_encode(prompts)[0].shape[1])  # exactly as HFLM encodes them (left padded)
    budget = min(max_new_tokens, lm.max_length - longest)
    if budget < 1:
        raise KdbenchError(
            f"{HELDOUT_TASK}: the longest evaluation prompt has {longest} tokens but the model holds only "
            f"{lm.max_length} positions, so nothing is left to generate. Lower data.max_prompt_length or use a "
            "model with more positions."
        )
    return budget


@lru_cache(maxsize=3)  # a full index holds ~80 MB
def _task_manager(include: tuple[str, ...], include_defaults: bool = True) -> TaskManager:
    """lm-eval's index of task names; cached because indexing its ~15,000 built-in tasks takes seconds.

    Caching is safe: the index maps names to YAML paths and lm-eval rereads a task's YAML each time
    it builds the task, so a rewritten kdbench_heldout task is always read afresh.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=include_defaults)


@dataclass(frozen=True)
class LmEvalScores:
    """lm-eval's scores of one model, ``{"<task>/<metric>": value}``, and which way each is better."""

    values: dict[str, float]
    higher_is_better: dict[str, bool]


def _flatten(output: dict[str, Any]) -> LmEvalScores:
    """Flat scores from lm-eval's ``{task: {"<metric>,<filter>": value, …}}`` and its ``higher_is_better``.

    Metric keys are the ones with a comma; the rest (``alias``, ``name``, ``sample_len``) is bookkeeping.
    A filter other than lm-eval's default ``none`` stays in the name (``gsm8k/exact_match,strict-match``).
    """
    values: dict[str, float] = {}
    higher_is_better: dict[str, bool] = {}
    for task, results in output["results"].items():
        directions = output.get("higher_is_better", {}).get(task, {})
        for key, value in results.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"{task}/{metric if filter_name == 'none' else key}"
            values[name] = float(value)
            higher_is_better[name] = bool(directions.get(metric, True))
    return LmEvalScores(values, higher_is_better)


def lm_eval_scores(model: PreTrainedModel, tokenizer: Any, settings: LmEvalConfig,
                   heldout_records: Sequence[Record], work_dir: Path) -> LmEvalScores:
    """Score the in-memory model with lm_eval.simple_evaluate on settings.tasks: flat
    ``{"<task>/<metric>": value}`` (no stderr entries, no aliases) and each metric's direction."""
    if not settings.tasks:
        return LmEvalScores({}, {})
    _require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = list(dict.fromkeys(settings.tasks))
    include_path = _resolved_include_path(settings)
    # Fail before any model work; the index of names is cached, and config validation built it already.
    others = [t for t in tasks if t != HELDOUT_TASK]
    errors = _unknown_task_lines(others, _known_task_names(include_path), settings.include_path) if others else []
    if errors:
        raise KdbenchError("\n".join(errors))
    if HELDOUT_TASK in tasks and not heldout_records:
        raise KdbenchError(f"{HELDOUT_TASK} needs at least one evaluation record; the evaluation split is empty.")
    def run(lm: HFLM, names: list[str], include: list[Path], include_defaults: bool) -> LmEvalScores:
        task_manager = _task_manager(tuple(str(p) for p in include), include_defaults=include_defaults)
        return _flatten(lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=settings.num_fewshot, limit=settings.limit, task_manager=task_manager,
            bootstrap_iters=0,  # stderr values are dropped anyway; bootstrapping them costs time
            log_samples=False,
        ))

    parts: list[LmEvalScores] = []
    with _quiet_and_isolated(model):
        if others:  # lm-eval's own tasks tokenise as lm-eval does (the tokenizer's default special tokens)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
            parts.append(run(lm, others, [Path(include_path)] if include_path else [], True))
        if HELDOUT_TASK in tasks:
            # kdbench's prompts carry no BOS (kdbench.data.prompt_ids), even where the tokenizer adds one by
            # default (OPT): the heldout task must see the very ids kdbench's own evaluation does.
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, add_bos_token=False)
            scored = heldout_records[: settings.limit] if settings.limit else heldout_records
            budget = _heldout_token_budget(lm, scored, settings.max_new_tokens)
            folder = write_heldout_task(heldout_records, work_dir / HELDOUT_TASK, budget)
            parts.append(run(lm, [HELDOUT_TASK], [folder], False))  # needs none of lm-eval's built-in tasks
    return LmEvalScores({k: v for part in parts for k, v in part.values.items()},
                        {k: v for part in parts for k, v in part.higher_is_better.items()})


# ---------------------------------------------------------------------------- config validation


def _resolved_include_path(settings: LmEvalConfig) -> str | None:
    # Absolute, so the same folder is one cache entry and lm-eval never depends on the working directory.
    return str(Path(settings.include_path).resolve()) if settings.include_path else None


def _known_task_names(include_path: str | None) -> frozenset[str]:
    """Every task, group and tag name lm-eval knows: built-in, in include_path, and kdbench_heldout."""
    return frozenset(_task_manager((include_path,) if include_path else ()).all_tasks) | {HELDOUT_TASK}


def _unknown_task_lines(tasks: Sequence[str], known: Collection[str], include_path: str | None) -> list[str]:
    lines = []
    for name in tasks:
        if name in known or (name.endswith(".yaml") and Path(name).is_file()):
            continue  # lm-eval also accepts the path of a task YAML
        close = difflib.get_close_matches(name, sorted(known), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
        where = f"lm-eval's tasks or those in {include_path}" if include_path else "lm-eval's tasks"
        lines.append(
            f"evaluation.lm_eval.tasks: {name!r} is not among {where}{hint} Fix the name (`lm-eval ls tasks` "
            "lists them), or put the task's YAML in a folder given as evaluation.lm_eval.include_path."
        )
    return lines


def unknown_tasks(settings: LmEvalConfig) -> list[str]:
    """Error lines (one per unknown task name, with 'did you mean …' and how to fix) for config validation."""
    if not settings.tasks:
        return []
    try:
        _require_lm_eval()
    except KdbenchError as error:
        return [str(error)]
    include_path = _resolved_include_path(settings)
    lines = []
    if include_path is not None and not Path(include_path).is_dir():
        lines.append(f"evaluation.lm_eval.include_path: {settings.include_path} is not a folder; expected a folder "
                     "of lm-eval task YAML files.")
        include_path = None
    shown = settings.include_path if include_path else None
    return lines + _unknown_task_lines(settings.tasks, _known_task_names(include_path), shown)
