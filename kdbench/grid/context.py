"""What every builder of a running graph may read (``RunContext``): the experiment, the plugins, the cache and the
results folder, the observers, this process's device, and the outputs of the stages run so far."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from kdbench import distributed
from kdbench.config import EvalDatasetConfig, Experiment, config_hash
from kdbench.data import Record, TokenizedExample, prompt_fits, tokenize_records
from kdbench.errors import KdbenchError
from kdbench.grid.cache import StageCache
from kdbench.grid.graph import StageGraph, StageKind
from kdbench.registry import Registries
from kdbench.results.store import host
from kdbench.runtime import say
from kdbench.train.step import PRECISION_DTYPES
from kdbench.zoo import count_parameters, load_model, load_tokenizer

FROZEN_ROLES = ("teacher", "model")  # parents a node runs without training them: loaded once, kept while needed
# What a stage cost, for the cells built on it (``cell_cost``): its steps, examples, tokens and seconds.
STATS_FILES = {StageKind.TRAIN: "train_stats.json", StageKind.TEACHER_OUTPUTS: "stats.json"}
Loaded = TypeVar("Loaded")


class UnreadableEntry(Exception):
    """A cache entry that passed its check but whose file still fails to load: the failure names the entry and its
    folder, not only the stage that read it. Not a ``KdbenchError``: the cells built on it fail, the grid goes on."""


class SilentObservers:
    """Stands in for the hook relay on every process but the main one, so progress is drawn once."""

    def __getattr__(self, name: str) -> Any:
        return lambda **kwargs: None


class RunContext:
    """What every builder may read while a graph runs: the experiment, the plugins, where the cache and
    the results live, the observers, this process's device, and the outputs of the stages run so far."""

    def __init__(self, graph: StageGraph, experiment: Experiment, registries: Registries, out_dir: Path,
                 cache_dir: Path, log_dir: Path | None = None) -> None:
        self.graph = graph
        self.experiment = experiment
        self.registries = registries
        self.out_dir = out_dir
        self.cache = StageCache(cache_dir)
        # where this process's watchdog writes: <out_dir>/logs unless told (an export has no results folder)
        self.log = (log_dir or out_dir / "logs") / f"{host()}-{os.getpid()}.log"
        self.hook = registries.manager.hook if distributed.is_main() else SilentObservers()
        self.metrics = [registries.metrics.get(name) for name in experiment.evaluation.metrics]
        # The frozen teacher and evaluated models run in the training precision on this process's device.
        self.dtype = PRECISION_DTYPES[experiment.training.precision]
        self.device = distributed.device()
        self.outputs: dict[str, str] = {}  # node key → its output: a cache folder, or a checkpoint's hub name or path
        # costed node key (training, teacher outputs) → its stats (STATS_FILES), plus "this_run": the seconds this
        # invocation spent on it
        self.train_stats: dict[str, dict[str, Any]] = {}
        self._frozen: dict[str, torch.nn.Module] = {}
        self._splits: dict[str, dict[str, list[Record]]] = {}
        self._noted_drops: set[tuple[str | None, str, str, str]] = set()  # (family, dataset, options hash, split)

    # -- parents' outputs --------------------------------------------------------------------------
    def path(self, key: str) -> str:
        return self.outputs[key]

    def read(self, key: str, what: str, load: Callable[[str], Loaded]) -> Loaded:
        """``load(path)`` of node ``key``'s output. When that output is a cache entry and ``what`` (a file, or the
        model) fails to load, the error names the entry, its folder and the file."""
        path = self.path(key)
        node = self.graph[key]
        if node.kind is StageKind.CHECKPOINT:
            return load(path)  # a checkpoint of the user's: its own loader's message says what to fix
        try:
            return load(path)
        except Exception as error:  # noqa: BLE001  (any failure to parse the file: safetensors, json, tokenizers)
            # load_tokenizer and load_model word theirs for a checkpoint (log in to the hub): the cause is what matters
            cause = error.__context__ if isinstance(error, KdbenchError) and error.__context__ else error
            detail = (str(cause).splitlines() or [""])[0][:300]
            raise UnreadableEntry(
                f"the cache entry {node.kind.value}/{key} ({node.label}) at {path} could not be read ({what}: "
                f"{type(cause).__name__}: {detail}). Move that folder away or delete it, and run again to build it "
                "anew.") from error

    def tokenizer(self, key: str) -> Any:
        return self.read(key, "the tokenizer", load_tokenizer)

    def frozen(self, key: str) -> torch.nn.Module:
        """The model node ``key`` produced, loaded once for running (teacher, evaluated model) in the training
        precision on this process's device, and kept until ``release``."""
        if key not in self._frozen:
            self._frozen[key] = self.read(key, "the model", lambda path: load_model(path, self.dtype, self.device))
        return self._frozen[key]

    def release(self, key: str) -> None:
        self._frozen.pop(key, None)

    def splits(self, dataset: str, options: dict[str, Any]) -> dict[str, list[Record]]:
        key = config_hash({"dataset": dataset, "options": options})
        if key not in self._splits:
            self._splits[key] = self.registries.datasets.get(dataset).load(dict(options))
        return self._splits[key]

    def note_dropped(self, family: str | None, dataset: str, options: dict[str, Any], split: str, total: int,
                     kept: int) -> None:
        """Say, once per run and family, how many prompts of a split ``data.max_prompt_length`` left out; nothing
        when it left out none. (The count depends on the family's tokenizer.)"""
        noted = (family, dataset, config_hash(options), split)
        if kept == total or noted in self._noted_drops or not distributed.is_main():
            return
        self._noted_drops.add(noted)
        limit = self.experiment.data.max_prompt_length
        say(f"{family + ': ' if family else ''}{total - kept} of {total} {split} prompts of dataset {dataset!r} are "
            f"longer than data.max_prompt_length={limit} tokens and are left out (dropped, not cut, as both papers "
            "do); raise data.max_prompt_length to keep them.")

    def train_records(self) -> list[Record]:
        return self.splits(self.experiment.data.dataset, self.experiment.data.options)["train"]

    def read_json(self, key: str, name: str) -> Any:
        """The JSON file ``name`` of node ``key``'s cache entry."""
        return self.read(key, name, lambda path: json.loads((Path(path) / name).read_text()))

    def tokenized(self, key: str, split: str = "train") -> list[TokenizedExample]:
        return [TokenizedExample(**e) for e in self.read_json(key, f"{split}.json")]

    def teacher_texts(self, key: str, tokenizer: Any) -> list[TokenizedExample]:
        """The stored teacher samples of ``key``, tokenised in the order of the tokenised training split."""
        responses = self.read_json(key, "generations.json")
        records = [{**record, "response": response} for record, response in zip(self.train_records(), responses)]
        data = self.experiment.data
        # Prompts are the gold ones, so the same records survive the prompt-length filter: index i of
        # both lists is the same prompt.
        return tokenize_records(records, tokenizer, data.max_length, data.max_prompt_length)

    def model_parameters(self, key: str) -> int | None:
        """Parameters of the model a stage produces: counted on the model when it is loaded, else from the
        config of the model it started from (training does not change the count), built or not; None when
        no config can be found offline."""
        if key in self._frozen:
            return count_parameters(self._frozen[key])
        try:
            return self.graph.start_of(key).spec.size(self.experiment.data).params
        except KdbenchError:
            return None

    def eval_records(self, tokenizer: Any, family: str | None, extra: EvalDatasetConfig | None = None,
                     validation: bool = False) -> list[Record]:
        """The evaluation split (of the experiment's data, or of an extra evaluation set; the validation split of
        the experiment's data with ``validation``) without prompts over ``data.max_prompt_length`` tokens (as both
        papers drop them), without gold responses under the set's ``min_response_tokens``, cut to
        ``max_examples`` (the validation split whole). How many prompts were too long is said once per run
        (``note_dropped``)."""
        evaluation, data = self.experiment.evaluation, self.experiment.data
        if validation:
            dataset, options, split = data.dataset, data.options, "validation"
            min_response, max_examples = 0, None  # the stage's selection cuts it (kdbench.grid.stages.validation)
        elif extra is None:
            dataset, options, split = data.dataset, data.options, evaluation.split
            min_response, max_examples = 0, evaluation.max_examples
        else:
            dataset, options, split = extra.dataset, extra.options, extra.split
            min_response, max_examples = extra.min_response_tokens, extra.max_examples
        records = self.splits(dataset, options)[split]

        def n_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        fitting = [r for r in records if prompt_fits(r, tokenizer, data.max_prompt_length)]
        self.note_dropped(family, dataset, options, split, len(records), len(fitting))
        kept = [r for r in fitting if min_response == 0 or n_tokens(r["response"]) >= min_response]
        return kept[:max_examples] if max_examples else kept
