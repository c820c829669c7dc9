"""``kdbench export-bases``, ``export-teachers`` and ``export-inits``: how the tiny suite's shipped models are made."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape

from kdbench.cli_options import (
    CacheOption,
    ExperimentOption,
    ModelsOption,
    PluginsDir,
    SeedsOption,
    StudentsOption,
    split_names,
    stderr,
    stdout,
    with_students,
)
from kdbench.errors import KdbenchError

if TYPE_CHECKING:
    from kdbench.config import Experiment
    from kdbench.grid.graph import StageGraph


def _export(out: Path, experiment: Optional[Path], cache_dir: Optional[Path], plugins_dir: Optional[Path], what: str,
            prepare: Callable[[Experiment], Experiment], models: Optional[str], seeds: Optional[int],
            targets: Callable[[StageGraph], dict[Path, str]], students: Optional[str] = None) -> None:
    """Train the stages ``targets`` picks from the graph of ``prepare(experiment)`` (sft cells) and copy each one's
    model folder to its path under ``out``: how the tiny suite's shipped teachers and SFT inits are made."""
    import shutil

    from kdbench.config import DEFAULT_EXPERIMENT, embedded_experiments, load_experiment
    from kdbench.grid.cache import default_cache_dir
    from kdbench.grid.collect import collect
    from kdbench.grid.execute import build_stages
    from kdbench.grid.manifest import MANIFEST
    from kdbench.grid.selection import resolve_selection
    from kdbench.preflight import check_writable
    from kdbench.registry import load_registries

    config = with_students(load_experiment(experiment), students)
    # which file: an installed kdbench's embedded default is not the tiny.yaml of the checkout one stands in
    source = experiment or f"the embedded default {embedded_experiments() / DEFAULT_EXPERIMENT}"
    stderr.print(f"export-{what}: experiment {escape(str(source))}", highlight=False)
    if config.models.scale != "tiny":
        raise KdbenchError(f"export-{what} trains tiny models; experiment {config.name!r} has models.scale "
                           f"{config.models.scale!r}. Give a tiny-scale experiment (such as the default).")
    config = prepare(config)
    if out.exists() and not out.is_dir():
        raise KdbenchError(f"--out {out} is a file; expected a folder to write the model folders into.")
    check_writable(out, "--out", "Pass another --out.", create=True)  # before hours of training, not after
    check_writable(cache_dir or default_cache_dir(), "the cache folder", "Pass another --cache-dir or set "
                   "KDBENCH_CACHE_DIR.", create=True)
    registries = load_registries(plugins_dir)
    graph = collect(config, registries, resolve_selection(config, registries, ["sft"], split_names(models, "--models"), seeds))
    chosen = targets(graph)
    built = build_stages(graph, list(chosen.values()), config, registries, cache_dir or default_cache_dir())
    for target, key in chosen.items():
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(built[key], target, ignore=shutil.ignore_patterns(MANIFEST))  # a model folder, not an entry
        stdout.print(f"{graph[key].label}: written to {target} (stage key {key})", highlight=False, markup=False)


def export_bases(
    out: Annotated[Path, typer.Option(help="Folder to write the bases into (<out>/<family>/<label>).")],
    models: ModelsOption = None,
    students: StudentsOption = None,
    experiment: ExperimentOption = None,
    cache_dir: CacheOption = None,
    plugins_dir: PluginsDir = None,
) -> None:
    """Pretrain each family's tiny teacher and students on the experiment's corpus (its `pretrain` block) and save
    each as an ordinary model folder.

    How the tiny suite's shipped bases (experiments/bases/) are made: every architecture is initialised with
    `pretrain.seed`, trained on the corpus as the block says and selected by the loss on its held-out chunks, and
    written with its tokenizer, training statistics and log (any `models.bases`, `models.teachers` or
    `models.sft_inits` the experiment names is ignored). Name `<out>/<family>` in `models.bases` and every run starts
    the teacher's SFT and the students from them; their recorded training counts in every row's cost."""

    def pretrained(config: Experiment) -> Experiment:
        if config.pretrain is None:
            raise KdbenchError(f"experiment {config.name!r} has no pretrain block, so there are no bases to train; add "
                               "pretrain: {corpus: ..., training: ...} (experiments/tiny.yaml has one).")
        return config.model_copy(update={
            "teacher": config.teacher.model_copy(update={"train": True}),
            "protocol": "uniform", "init": config.init.model_copy(update={"start": "base"}),
            "models": config.models.model_copy(update={"bases": {}, "teachers": {}, "sft_inits": {}})})

    def bases(graph: StageGraph) -> dict[Path, str]:
        from kdbench.grid.graph import StageKind

        return {out / str(node.family) / node.label.split("/")[1]: node.key for node in graph
                if node.kind is StageKind.TRAIN and node.label.endswith("/base")}

    _export(out, experiment, cache_dir, plugins_dir, "bases", pretrained, models, 1, bases, students)


def export_teachers(
    out: Annotated[Path, typer.Option(help="Folder to write one model folder per family into (<out>/<family>).")],
    models: ModelsOption = None,
    experiment: ExperimentOption = None,
    cache_dir: CacheOption = None,
    plugins_dir: PluginsDir = None,
) -> None:
    """Train each family's tiny teacher with the experiment's teacher stage and save it as an ordinary model folder.

    How the tiny suite's shipped teachers (experiments/teachers/) are made: the experiment's `teacher` block is run
    from a random initialisation (any `models.teachers` folder it names is ignored), selected on validation as
    every training stage is, and written with its tokenizer, training statistics and log. An experiment that
    names the folders in `models.teachers` (with `teacher.train: false`) then starts every run from them."""
    from kdbench.grid.collect import TEACHER_METHOD

    def from_scratch(config: Experiment) -> Experiment:
        return config.model_copy(update={"teacher": config.teacher.model_copy(update={"train": True}),
                                         "models": config.models.model_copy(update={"teachers": {}})})

    def teachers(graph: StageGraph) -> dict[Path, str]:
        return {out / str(node.family): node.deps["model"] for node in graph.cells() if node.spec.method == TEACHER_METHOD}

    _export(out, experiment, cache_dir, plugins_dir, "teachers", from_scratch, models, 1, teachers)


def export_inits(
    out: Annotated[Path, typer.Option(help="Folder to write the SFT inits into (<out>/<family>/<student>/seed<k>).")],
    models: ModelsOption = None,
    students: StudentsOption = None,
    seeds: SeedsOption = None,
    experiment: ExperimentOption = None,
    cache_dir: CacheOption = None,
    plugins_dir: PluginsDir = None,
) -> None:
    """Train the SFT init of every family, student and training seed with the experiment's `init` block and save each
    as an ordinary model folder.

    How shipped SFT inits are made: each student is initialised with its training seed, trained with SFT as the
    `init` block says, kept by its `rule` (the best validation loss, or the final step), and written with its
    tokenizer, training statistics and log (any `models.sft_inits` the experiment names is ignored). Name
    `<out>/<family>` in `models.sft_inits` and every method that starts from the SFT student reads them instead of
    training them; their recorded training counts in every row's cost."""

    def trained_inits(config: Experiment) -> Experiment:
        return config.model_copy(update={
            "protocol": "uniform", "init": config.init.model_copy(update={"start": "sft"}),
            "models": config.models.model_copy(update={"sft_inits": {}})})

    def inits(graph: StageGraph) -> dict[Path, str]:
        return {out / cell.spec.family / cell.spec.student / f"seed{cell.spec.seed}":
                graph[cell.deps["model"]].deps["init"] for cell in graph.cells() if cell.spec.kind == "student"}

    _export(out, experiment, cache_dir, plugins_dir, "inits", trained_inits, models, seeds, inits, students)
