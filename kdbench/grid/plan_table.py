"""``kdbench run --dry-run``'s tables: the plan (``kdbench.grid.plan``) printed for a person."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdbench.grid.estimate import GIB
from kdbench.grid.plan import Plan, steps_text
from kdbench.grid.timing import duration
from kdbench.report.card import render_card


def _gib(nbytes: int) -> str:
    if 0 < nbytes < GIB / 200:  # would print as 0.00, which reads as "nothing"
        return "<0.01"
    return f"{nbytes / GIB:.2f}"


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "?"
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


def _params(count: int | None) -> str:
    if count is None:
        return "?"
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"


def print_plan(plan: Plan, console: Console) -> None:
    """The plan as rich tables: models, stages in run order, training settings and memory per GPU."""
    mark = "≈" if plan.data.estimated else ""
    train = "?" if plan.train_examples is None else f"{mark}{plan.train_examples:,}"
    evaluation = "?" if plan.eval_examples is None else f"{mark}{plan.eval_examples:,}"
    console.print(f"[bold]Dry run of {escape(plan.experiment)}[/bold] — scale {plan.scale}, {plan.gpus} GPU(s), dataset "
                  f"{escape(plan.dataset)}: {train} training examples, {evaluation} evaluation examples × "
                  f"{len(plan.eval_seeds)} seeds; {len(plan.stages)} stages, {len(plan.graph.cells())} cells. "
                  "Nothing is loaded or trained.")
    console.print(f"[bold]Protocol card[/bold]\n{escape(render_card(plan.card))}", highlight=False)
    for family in dict.fromkeys(model.family for model in plan.models):
        models = Table(title=f"{family}: models")
        for column in ("role", "label", "checkpoint", "parameters", "layers × width, heads", "vocab", "size from"):
            models.add_column(column, justify="right" if column in ("parameters", "vocab") else "left")
        for model in (m for m in plan.models if m.family == family):
            size = model.size
            if size is None:
                models.add_row(model.role, model.label, model.checkpoint, "?", "?", "?", model.problem)
            else:
                models.add_row(model.role, model.label, model.checkpoint, f"{size.params:,}",
                               f"{size.layers} × {size.hidden}, {size.heads}", f"{size.vocab:,}", size.source)
        console.print(models)

    numbers = {stage.node.key: stage.number for stage in plan.stages}
    stages = Table(title="stages in run order (key: the cache key; after: the stages it reads)")
    for column in ("#", "stage", "for", "after", "key", "time*", "work"):
        stages.add_column(column, justify="right" if column in ("#", "time*") else "left")
    for stage in plan.stages:
        after = ", ".join(str(numbers[parent]) for parent in stage.node.deps.values())
        time = "cached" if stage.cached else duration(stage.seconds)
        stages.add_row(str(stage.number), stage.name, stage.node.label, after or "–", stage.node.key[:8], time,
                       stage.work)
    console.print(stages)
    console.print(f"[bold]Estimated time[/bold]: {duration(plan.seconds)} for the stages not in the cache, one after "
                  f"another, on {plan.gpus} process(es) of {escape(plan.device.kind)} ({escape(plan.device.source)}).",
                  highlight=False)
    console.print(f"[bold]Writes, at most[/bold]: {_size(plan.disk_bytes(cells=True))} in the results folder, "
                  f"{_size(plan.disk_bytes(cells=False))} in the cache (what the stages not in it keep, sequences counted "
                  "at data.max_length, plus the largest resume checkpoint while its stage runs).", highlight=False)

    if plan.training_stages:
        training = Table(title="training stages")
        for column in ("#", "stage", "model", "params", "precision", "ZeRO", "GPUs",
                       "micro × accum × GPUs = global", "seqs", "optimizer steps"):
            training.add_column(column, justify="left" if column in ("stage", "model", "precision") else "right")
        memory = Table(title="memory per GPU, GiB (activations: estimate)")
        for column in ("#", "stage", "weights", "gradients", "optimizer", "teacher", "activations*", "total"):
            memory.add_column(column, justify="left" if column == "stage" else "right")
        for stage in plan.training_stages:
            t = stage.training
            assert t is not None
            zero = "DDP" if t.zero_stage is None else str(t.zero_stage)
            training.add_row(str(stage.number), stage.name, t.model, _params(t.params), t.precision, zero, str(t.gpus),
                             f"{t.batch_size} × {t.grad_accum} × {t.gpus} = {t.global_batch}", str(t.sequences), steps_text(t))
            m = t.memory
            if m is None:
                memory.add_row(str(stage.number), t.model, "?", "?", "?", "?", "?", "?")
            else:
                memory.add_row(str(stage.number), t.model, _gib(m.weights), _gib(m.gradients), _gib(m.optimizer),
                               _gib(m.teacher) if m.teacher else "–", _gib(m.activations), _gib(m.total))
        console.print(training)
        console.print(memory)
        costs = Table(title="cells: optimizer steps of their own stage, and with every training stage before it")
        for column in ("cell", "own", "total"):
            costs.add_column(column, justify="left" if column == "cell" else "right")
        for cell in plan.graph.cells():
            own, total = plan.cell_steps(cell)
            costs.add_row(cell.label, "?" if own is None else f"{own:,}", "?" if total is None else f"{total:,}")
        console.print(costs)
    console.print("[bold]Notes[/bold]")
    for note in plan.notes:
        console.print(f"• {note}", markup=False)
    console.print("• seqs: sequences per prompt the student runs with gradients in a micro-batch (gold, teacher text, "
                  "own sample, rollout); ≈: from documented data sizes; *: activations after Korthikanti et al. 2022, "
                  "per layer s·b·h·(34 + 5·a·s/h) bytes in 16-bit (2·s·b·h with gradient checkpointing) plus the output "
                  "layer, an estimate; time*: FLOPs at a sustained rate plus a fixed cost per micro-batch and per "
                  "decoding step (kdbench.grid.timing), sequences counted at data.max_length: right within a small "
                  "factor, meant to catch a budget off by orders of magnitude", markup=False)
