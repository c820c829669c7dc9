"""The ``kdbench`` command: thin wrappers over library functions.

A mistake the user can fix (``KdbenchError``) prints one paragraph and exits with code 2, never a
traceback; results already written stay where they are. SIGINT and SIGTERM stop any command cleanly
(``kdbench.runtime.signals``): one line says how to go on, and the exit code is 130 or 143.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from kdbench.cli_cache import cache_app
from kdbench.cli_export import export_bases, export_inits, export_teachers
from kdbench.cli_options import (
    CacheOption,
    ExperimentOption,
    MethodsOption,
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
from kdbench.runtime import say
from kdbench.runtime.signals import Stopped, stopping_on_signals

if TYPE_CHECKING:

    from kdbench.report.build import Report

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark knowledge-distillation objectives for causal language models under one protocol.")
def _report(run_dir: Path, title: str | None = None) -> Report:
    """The report of a results folder; warns (on stderr, so stdout stays machine-readable) when one family's cells
    ran with different shared settings."""
    from kdbench.report.build import build_report

    built = build_report(run_dir, title)
    for mismatch in built.warnings:
        stderr.print(f"[yellow]warning:[/] not like with like — {escape(mismatch)}", highlight=False)
    busy = built.folder.in_progress
    if busy:
        stderr.print(f"[yellow]note:[/] {len(busy)} cell{'s' * (len(busy) != 1)} in progress (a worker is evaluating "
                     f"{'them' if len(busy) != 1 else 'it'} now) and left out: {escape(', '.join(busy))}. Report again when "
                     "the run has finished.", highlight=False)
    for cell, why in built.folder.invalid:
        stderr.print(f"[yellow]note:[/] cell {escape(cell)} is left out: {escape(why)}", highlight=False)
    waiting = built.folder.unfinished
    if waiting:
        shown = ", ".join(waiting[:5]) + (f" and {len(waiting) - 5} more" if len(waiting) > 5 else "")
        stderr.print(f"[yellow]note:[/] {len(waiting)} cell{'s' * (len(waiting) != 1)} of the grid have no result yet "
                     f"(training, queued, or stopped before finishing): {escape(shown)}.", highlight=False)
    return built


def _print_report(built: Report) -> None:
    """The protocol cards, then the leaderboard table (its caption says how the statistics are computed), the per-task
    scores and the positive controls."""
    from kdbench.report.card import render_card
    from kdbench.report.render import terminal_tables

    for card in built.cards:
        stdout.print(f"[bold]Protocol card[/]\n{escape(render_card(card))}", highlight=False)
    for index, table in enumerate(terminal_tables(built.rows, title=built.title, width=stdout.width)):
        if index:
            stdout.print()
        stdout.print(table)


def _write_report(path: Path, text: str) -> None:
    from kdbench.results.store import atomic_write_text

    if path.is_dir():
        raise KdbenchError(f"-o {path} is a folder; expected a file to write the report to, such as "
                           f"{path / 'report.html'}.")
    try:
        atomic_write_text(path, text)
    except OSError as error:
        raise KdbenchError(f"Cannot write the report to {path} ({error.strerror or error}); expected a file in a "
                           "folder you can write to. Pass another -o path.") from None


@app.command()
def run(
    methods: MethodsOption = None,
    models: ModelsOption = None,
    experiment: ExperimentOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default: results/<experiment name>).")] = None,
    seeds: SeedsOption = None,
    students: StudentsOption = None,
    engine: Annotated[Optional[str], typer.Option(help="Override training.engine: deepspeed or accelerate.")] = None,
    cache_dir: CacheOption = None,
    plugins_dir: PluginsDir = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=(
        "Print the stage graph (stages, keys, optimizer steps, memory per GPU) without loading weights or training."))] = False,
    gpus: Annotated[Optional[int], typer.Option(min=1, help=(
        "GPUs the --dry-run plan assumes (default: the launcher's WORLD_SIZE, else 1)."))] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="With --dry-run: table or json.")] = "table",
    executor: Annotated[str, typer.Option(help=(
        "local (this process, or every process of accelerate launch), slurm (submitit jobs: the shared stages, then "
        "the cells as a job array) or submitit-local (the same jobs as processes on this machine). See docs/cluster.md."
    ))] = "local",
    slurm_partition: Annotated[Optional[str], typer.Option(help="With --executor slurm: the partition of every job.")] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option(min=1, help=(
        "With a cluster executor: GPUs per job, one process each, forming one data-parallel run (default: none on "
        "Slurm; a submitit-local job sees this machine's GPUs)."))] = None,
    timeout_min: Annotated[Optional[int], typer.Option(min=1, help=(
        "With a cluster executor: time limit of each job in minutes; a job that reaches it is requeued and resumes "
        "(default 240)."))] = None,
    slurm_option: Annotated[Optional[list[str]], typer.Option(help=(
        "With --executor slurm: an sbatch option as KEY=VALUE (account=proj, qos=high, mem=64G); repeat for more."))] = None,
    slurm_array_parallelism: Annotated[Optional[int], typer.Option(min=1, help=(
        "With --executor slurm: at most this many cell jobs run at once."))] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help=(
        "With a cluster executor: print the job ids and return; `kdbench report OUT` reads the results later."))] = False,
    poll_seconds: Annotated[Optional[float], typer.Option(help=(
        "With a cluster executor: how often the waiting command looks at its jobs, in seconds (default 30 on Slurm, "
        "one sacct call a look; 1 for submitit-local)."))] = None,
    unreported_seconds: Annotated[Optional[float], typer.Option(help=(
        "With --executor slurm: how long the waiting command goes on while Slurm's accounting reports no state for a "
        "job (sacct fails, or does not list it) before it stops with an error (default 600)."))] = None,
    allow_long_budget: Annotated[bool, typer.Option("--allow-long-budget", help=(
        "Run a grid whose estimated wall time is beyond runtime.max_estimated_days (30 by default): the budget is "
        "intended."))] = False,
    workers: Annotated[int, typer.Option(min=1, help=(
        "Run the grid as this many processes on this machine, one thread each, sharing the cache and results folder "
        "(on a CPU, one per core is fastest); a cell's numbers then do not depend on the machine's core count, and "
        "the committed references are made so."))] = 1,
) -> None:
    """Train and evaluate every (family, student, method, seed) cell, then print the leaderboard.

    The grid is collected into a graph of stages first (what --dry-run prints), then run: finished cells
    and cached stages are reused; a stage that fails or diverges marks the cells that need it and the rest
    still run (exit code 1). Under `accelerate launch` (or torchrun, or the deepspeed launcher) every
    process runs this same command: training is data-parallel and the main process alone writes results.
    With --executor slurm or submitit-local the same run is spread over submitit jobs, and this command waits
    for them and prints the leaderboard (docs/cluster.md)."""
    from kdbench import distributed
    from kdbench.config import load_experiment
    from kdbench.grid.cache import default_cache_dir
    from kdbench.grid.selection import resolve_selection
    from kdbench.grid.session import GridRequest, check_time_bound, plan_prepared, prepare, run_prepared
    from kdbench.registry import load_registries
    from kdbench.report.render import render
    from kdbench.results.store import atomic_write_json, atomic_write_text

    if format not in ("table", "json"):
        raise KdbenchError(f"--format {format!r} is not a plan format; expected table or json.")
    if format != "table" and not dry_run:
        raise KdbenchError("--format applies to --dry-run; a run prints its leaderboard (use `kdbench report "
                           "--format json` for the results).")
    from kdbench.grid.cluster_options import cluster_options

    cluster = cluster_options(executor, slurm_partition=slurm_partition, gpus_per_node=gpus_per_node,
                              timeout_min=timeout_min, slurm_options=slurm_option or [],
                              slurm_array_parallelism=slurm_array_parallelism, no_wait=no_wait,
                              poll_seconds=poll_seconds, unreported_seconds=unreported_seconds)
    config = with_students(load_experiment(experiment), students)
    if engine is not None:
        if engine not in ("deepspeed", "accelerate"):
            raise KdbenchError(f"--engine {engine!r} is not an engine; expected deepspeed or accelerate.")
        pretrain = config.pretrain
        config = config.model_copy(update={
            "training": config.training.model_copy(update={"engine": engine}),
            "teacher": config.teacher.model_copy(update={
                "training": config.teacher_training.model_copy(update={"engine": engine})}),
            "init": config.init.model_copy(update={"training": config.init_training.model_copy(update={"engine": engine})}),
            "pretrain": None if pretrain is None else pretrain.model_copy(update={
                "training": pretrain.training.model_copy(update={"engine": engine})}),
        })
    registries = load_registries(plugins_dir)
    selection = resolve_selection(config, registries, split_names(methods), split_names(models, "--models"), seeds)
    out_dir, cache = out or Path("results") / config.name, cache_dir or default_cache_dir()
    prepared = prepare(GridRequest(config, selection, plugins_dir, out_dir, cache), registries)
    graph = prepared.graph
    from kdbench.preflight import check_before_run

    # Unwritable folders, missing checkpoints, empty data: found now, before any stage (a dry run creates nothing).
    check_before_run(config, registries, graph, out_dir, cache, dry_run)
    job_gpus = cluster.gpus_per_node if cluster is not None else None
    plan = plan_prepared(prepared, gpus or job_gpus or distributed.launched_world_size(), bool(gpus or job_gpus))
    if dry_run:
        from kdbench.grid.plan_table import print_plan

        if format == "json":
            sys.stdout.write(json.dumps(plan.to_json(), indent=2, default=str) + "\n")
        else:
            print_plan(plan, stdout)
        try:
            check_time_bound(plan, config)
        except KdbenchError as refused:
            stderr.print(f"[bold yellow]note:[/] a run would refuse: {escape(str(refused))}", highlight=False)
        return
    if not allow_long_budget:
        check_time_bound(plan, config)
    from kdbench.preflight import space_warnings

    for warning in space_warnings(out_dir, plan.disk_bytes(cells=True), cache, plan.disk_bytes(cells=False)):
        stderr.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
    if distributed.is_main():  # before any cell: a report taken meanwhile counts those without a result
        from kdbench.results.store import record_grid

        record_grid(out_dir, [cell.spec.label for cell in graph.cells()])  # family/student/method/seed<k>
    lost: list[str] = []  # cluster cells whose job ended without a result (it printed why)
    if workers > 1:
        from kdbench.grid.workers import run_workers

        if cluster is not None or distributed.launched_world_size() > 1:
            raise KdbenchError(f"--workers {workers} runs local processes; it does not combine with --executor "
                               f"{executor} or a launcher's processes. Drop --workers, or run without them.")
        code = run_workers(sys.argv[1:], workers)
        if any(out_dir.glob("cells/*/*/*/*/result.json")):
            _print_report(_report(out_dir, f"kdbench leaderboard: {config.name}"))
        if code:
            raise typer.Exit(code)
        return
    if cluster is not None:
        from kdbench.grid.cluster import run_on_cluster

        finished = run_on_cluster(prepared, cluster)
        if finished is None:  # --no-wait: the jobs run on
            return
        summary, lost = finished.summary, finished.lost
    else:
        summary = run_prepared(prepared)
    if distributed.is_main() and summary.results:
        built = _report(out_dir, f"kdbench leaderboard: {config.name}")
        atomic_write_json(out_dir / "experiment.json", config.model_dump())
        for fmt in ("md", "json"):
            atomic_write_text(out_dir / f"leaderboard.{fmt}", render(built, fmt) + "\n")
        _print_report(built)
        for result in summary.unscored:
            failure = result.get("failure", {})
            stderr.print(f"[bold red]{result['status']}:[/] " + escape(
                f"{result['family']}/{result['student']}/{result['method']}/seed{result['train_seed']} — "
                f"{failure.get('reason', '')} (stage {failure.get('stage', '?')})"),
                         highlight=False)
    if distributed.is_main() and summary.unrecorded:
        stderr.print(f"[bold red]unfinished:[/] {len(summary.unrecorded)} cell(s) whose results could not be written "
                     f"(why is said above): {escape(', '.join(summary.unrecorded))}. Run the same command again once "
                     "that is fixed.", highlight=False)
    distributed.destroy_process_group()
    if summary.unscored or summary.unrecorded or lost:
        raise typer.Exit(1)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A results folder written by `kdbench run`.")] = Path("results/tiny"),
    format: Annotated[str, typer.Option("--format", "-f", help="table, md, csv, json or html.")] = "table",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help=(
        "Write to this file instead of stdout (md, csv, json, html)."))] = None,
) -> None:
    """The protocol card and leaderboard of a results folder, from its result files alone.

    Each row is one (family, student, method): per metric the mean ± sample std over training seeds (each seed's
    score the mean over its evaluation seeds) and a 95% Student-t interval over them; its rank by the primary
    metric within its (family, student); "≈ best": yes when a paired bootstrap over the test examples cannot tell
    it from the best row there (with its p-value); gap recovered, (method − sft) / (teacher − sft) with a bootstrap
    interval; the seeds; and its cost (optimizer steps and training tokens, own stage / with ancestors, student
    and teacher forward passes, peak memory, time). md adds exact match by gold-response length and, for a
    paper-protocol folder, the published numbers; json holds every row as data; html writes one self-contained
    page with plots, validation curves, per-task scores and sampled responses (use -o report.html)."""
    from kdbench.report.render import RENDER_FORMATS, render

    if format not in ("table", *RENDER_FORMATS):
        raise KdbenchError(f"--format {format!r} is not a report format; expected table, {', '.join(RENDER_FORMATS)}.")
    if format == "table" and output is not None:
        raise KdbenchError("--format table prints to the terminal; pass -f md, csv, json or html with -o.")
    if run_dir.is_file():
        raise KdbenchError(f"{run_dir} is a file; expected the results folder a `kdbench run` wrote (its --out, "
                           "results/<experiment name> by default).")
    built = _report(run_dir)
    if format == "table":
        _print_report(built)
        return
    text = render(built, format) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        _write_report(output, text)
        stderr.print(f"{format} report written to {output}", highlight=False, markup=False)


@app.command()
def plugins(plugins_dir: PluginsDir = None) -> None:
    """Every registered objective, sequence source, model family, dataset and metric, with its origin."""
    from kdbench.registry import load_registries

    registries = load_registries(plugins_dir)
    table = Table(title="kdbench plugins")
    for column in ("kind", "name", "description", "origin"):
        table.add_column(column)
    for kind, registry in (("objective", registries.objectives), ("sequence source", registries.sources),
                           ("model family", registries.families), ("dataset", registries.datasets),
                           ("metric", registries.metrics)):
        for name in registry.names():
            item = registry.get(name)
            description = getattr(item, "summary", None) or getattr(item, "description", "")
            table.add_row(kind, name, description, registry.origin(name))
    stdout.print(table)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Experiment YAML files.")],
    plugins_dir: PluginsDir = None,
    gpus: Annotated[Optional[int], typer.Option(min=1, help=(
        "GPUs the budget's time estimate assumes (default: the launcher's WORLD_SIZE, else 1; this machine's GPU "
        "kind, else H100s when GPUs are asked for or the experiment is at paper scale, else this CPU)."))] = None,
    allow_long_budget: Annotated[bool, typer.Option("--allow-long-budget", help=(
        "Accept a grid whose estimated wall time is beyond runtime.max_estimated_days: the budget is intended."))] = False,
) -> None:
    """Check experiment files and report every error at once, one line per field; then estimate each grid's wall
    time as `kdbench run --dry-run` does, and refuse one beyond its runtime.max_estimated_days."""
    from kdbench import distributed
    from kdbench.config import SchemaErrors, parse_experiment, read_experiment_yaml
    from kdbench.grid.cache import default_cache_dir
    from kdbench.grid.selection import method_errors, resolve_selection, semantic_errors
    from kdbench.grid.session import GridRequest, check_time_bound, plan_prepared, prepare
    from kdbench.grid.timing import duration
    from kdbench.preflight import model_errors
    from kdbench.registry import load_registries

    registries = load_registries(plugins_dir)
    failures: list[str] = []
    for path in files:
        try:
            raw, source = read_experiment_yaml(path)
            try:
                parsed = parse_experiment(raw, source)
                errors = semantic_errors(parsed, registries) + model_errors(parsed, registries)
            except SchemaErrors as schema:  # the methods block is checked on its own, so every error shows at once
                errors = [line.strip() for line in schema.lines] + method_errors(raw.get("methods"), registries)
            if errors:
                raise KdbenchError(f"{source} has {len(errors)} error(s):\n" + "\n".join(f"  {e}" for e in errors))
            # The budget, estimated as `kdbench run` would estimate it (every method and seed, this machine).
            request = GridRequest(parsed, resolve_selection(parsed, registries, None, None, None), plugins_dir,
                                  Path("results") / parsed.name, default_cache_dir())
            plan = plan_prepared(prepare(request, registries), gpus or distributed.launched_world_size(), bool(gpus))
            try:
                if not allow_long_budget:
                    check_time_bound(plan, parsed)
            except KdbenchError as refused:
                raise KdbenchError(f"{source}: {refused}") from None
            stdout.print(f"[green]ok[/] {escape(str(path))}: estimated {duration(plan.seconds)} on {plan.gpus} "
                          f"process(es) of {escape(plan.device.kind)}", highlight=False)
        except KdbenchError as error:
            failures.append(str(error))
    if failures:
        raise KdbenchError("\n".join(failures))


def _take_local_rank_argument() -> None:
    """The deepspeed launcher appends ``--local_rank=N`` to the command; kdbench reads ``LOCAL_RANK``."""
    for argument in list(sys.argv[1:]):
        if argument.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", argument.split("=", 1)[1])
            sys.argv.remove(argument)


def _reflowed(docstring: str) -> str:
    """A command's docstring as its help: each paragraph on one line, so the terminal wraps it to its own width
    (Typer keeps a docstring's line breaks, which break up in a terminal narrower than the source)."""
    paragraphs = inspect.cleandoc(docstring).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in paragraph.splitlines()) for paragraph in paragraphs)


app.command("export-bases")(export_bases)
app.command("export-teachers")(export_teachers)
app.command("export-inits")(export_inits)
app.add_typer(cache_app, name="cache")
for _command in (*app.registered_commands, *cache_app.registered_commands):
    if _command.help is None and _command.callback is not None and _command.callback.__doc__:
        _command.help = _reflowed(_command.callback.__doc__)


def main() -> None:
    from kdbench.process import command_environment, environment, quiet_libraries
    from kdbench.results.store import StorageFull

    _take_local_rank_argument()
    quiet_libraries()
    try:
        with environment(command_environment()), stopping_on_signals():
            app(standalone_mode=True)
    except KdbenchError as error:
        stderr.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        sys.exit(2)
    except StorageFull as error:  # a write outside any stage (the leaderboard, a report file)
        stderr.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        sys.exit(1)
    except Stopped as stop:
        if os.environ.get("RANK", "0") == "0":  # a launch's processes all stop; its main process says so once
            say(f"stopped by {stop.describe()}. What finished is kept (scored cells, cached stages, the interrupted "
                "training stage's resume checkpoints): run the same command again to go on from there.")
        sys.exit(stop.exit_code)
