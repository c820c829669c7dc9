"""Rich progress bars for every long stage, as a lifecycle-observer plugin.

It draws on stderr, so ``kdbench run`` can still pipe its leaderboard from stdout.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kdbench import hookimpl


class ProgressDisplay:
    def __init__(self) -> None:
        self.console = Console(stderr=True, emoji=False)  # stage and cell names, paths: quoted, not rendered
        self.progress: Progress | None = None
        self.tasks: dict[str, Any] = {}

    def start(self) -> None:
        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console, transient=True,
        )
        self.progress.start()

    def stage_start(self, stage: str, total: int | None) -> None:
        if self.progress is None:
            self.start()
        assert self.progress is not None
        if stage in self.tasks:
            self.progress.reset(self.tasks[stage], total=total)
        else:
            self.tasks[stage] = self.progress.add_task(escape(stage), total=total, info="")

    def step_end(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if self.progress is None or stage not in self.tasks:
            return
        info = f"loss {metrics['loss']:.3f}" if "loss" in metrics else ""
        self.progress.update(self.tasks[stage], completed=step, info=info)

    def stage_end(self, stage: str, seconds: float, cached: bool) -> None:
        if self.progress is not None and stage in self.tasks:
            self.progress.remove_task(self.tasks.pop(stage))
        if not stage.endswith((": train", ": generate", ": teacher_outputs")) or cached:  # the long stages
            return
        self.console.print(f"[green]✓[/] {escape(stage)} [dim]{seconds:.1f}s[/]")

    def cell_end(self, cell: str, result: dict[str, Any]) -> None:
        failure = result.get("failure")
        if failure is not None:  # the stage that failed drew a bar that no stage end will remove
            self.console.print("[red]✗[/] " + escape(f"{cell}: {result['status']} in {failure['stage']}: {failure['reason']}"),
                               highlight=False)
            stale = [s for s in self.tasks if s.startswith((cell, failure["stage"].rsplit(": ", 1)[0]))]
        else:
            scores = ", ".join(f"{name} {sum(v.values()) / len(v):.1f}" for name, v in result["metrics"].items() if v)
            self.console.print(f"[green]✓[/] {escape(cell)}: {scores} [dim]({result['wall_seconds']['this_run']:.1f}s)[/]")
            stale = [s for s in self.tasks if s.startswith(cell)]
        for stage in stale:
            self.stage_end(stage, 0.0, True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.tasks.clear()


DISPLAY = ProgressDisplay()


@hookimpl
def kdbench_on_run_start(plan: dict[str, Any]) -> None:
    cells = f"{len(plan['to_run'])} of {len(plan['cells'])} cells to run, {plan['stages']} stages"
    DISPLAY.console.print(f"[bold]kdbench[/] {escape(plan['experiment'])}: {cells} → {escape(plan['out_dir'])}")


@hookimpl
def kdbench_on_stage_start(stage: str, total: int | None) -> None:
    DISPLAY.stage_start(stage, total)


@hookimpl
def kdbench_on_step_end(stage: str, step: int, metrics: dict[str, float]) -> None:
    DISPLAY.step_end(stage, step, metrics)


@hookimpl
def kdbench_on_stage_end(stage: str, seconds: float, cached: bool) -> None:
    DISPLAY.stage_end(stage, seconds, cached)


@hookimpl
def kdbench_on_cell_end(cell: str, result: dict[str, Any]) -> None:
    DISPLAY.cell_end(cell, result)


@hookimpl
def kdbench_on_run_end(out_dir: str, seconds: float) -> None:
    DISPLAY.stop()
    DISPLAY.console.print(f"[bold]done[/] in {seconds:.0f}s; results in {escape(out_dir)}")
