"""Exact resume inside a training stage: a stage stopped at any moment continues from its latest checkpoint and
ends exactly where an uninterrupted stage ends (weights bit for bit, every logged loss, every counter).

The first tests stop ``train`` in-process (an observer raises after a given step, as a kill would land between
two checkpoints) and call it again on the same resume folder. The last one kills real ``kdbench run`` processes
with SIGKILL inside training stages, reruns the same command, and compares the cells' metrics with those of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kdbench.config import TrainingConfig
from kdbench.data import tokenize_corpus
from kdbench.registry import load_registries
from kdbench.testing.kit import TinyKit
from kdbench.train.checkpoints import TrainStats, latest_checkpoint
from kdbench.train.engine import TrainingData, Validation, train, validation_loss

pytestmark = pytest.mark.slow  # stages killed and resumed

STEPS = 8


class Interrupted(Exception):
    """Stands in for a kill: raised by ``StopAfter`` once the stage has run a given optimizer step."""


class StopAfter:
    """An observer that stops the stage after optimizer step ``step`` (None: never)."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def kdbench_on_stage_start(self, stage: str, total: int | None) -> None: ...

    def kdbench_on_step_end(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            raise Interrupted(step)


def with_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """The tiny families build without dropout; with it, every training step draws from torch's global generator,
    which a checkpoint must then carry."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    return model


@dataclasses.dataclass(frozen=True)
class Case:
    method: str
    params: dict[str, Any]
    settings: dict[str, Any]
    stops: tuple[int, ...]  # the optimizer steps after which successive attempts are stopped


CASES = [
    # Off-policy under DeepSpeed ZeRO-1 (the default engine): dropout, gradient accumulation, the pre-training
    # term's own data order, and selection that hands on an early step's weights.
    Case("kd", {}, {"engine": "deepspeed", "zero_stage": 1, "grad_accum": 2, "lm_coef": 0.5}, (5, 7)),
    # On-policy: rollouts collected in groups of 2 micro-batches and reused for 2 inner epochs, so a checkpoint
    # falls in the middle of a queue; plain accelerate.
    Case("minillm", {"rollout_batches": 2, "inner_epochs": 2}, {"engine": "accelerate"}, (3, 6)),
    # On-policy: fresh student samples every micro-batch beside the stored teacher text.
    Case("dpkd", {}, {"engine": "deepspeed", "zero_stage": 1}, (3,)),
    # Off-policy under ZeRO-3: every process's shard of weights and optimizer state.
    Case("kd", {}, {"engine": "deepspeed", "zero_stage": 3}, (3,)),
]


def run_stage(kit: TinyKit, case: Case, resume_dir: Path | None, stop: int | None) -> tuple[torch.nn.Module, TrainStats]:
    objective = load_registries().objectives.get(case.method)
    tokenizer = kit.tokenizer
    lm_text = tokenize_corpus([f"{e.input_ids}" for e in kit.examples[:60]], tokenizer, 32, max_chunks=40)
    data = TrainingData(kit.examples, tokenizer.pad_token_id, tokenizer.eos_token_id, kit.teacher_texts, 6, lm_text)
    settings = TrainingConfig(**{"lr": 1e-2, "warmup_steps": 2, "batch_size": 8, "max_steps": STEPS, "threads": 1,
                                 **case.settings})
    held_out = kit.examples[-24:]
    # The highest validation loss wins: an early step's weights are handed on, so the selection's copy of them
    # must survive the interruption.
    validation = Validation(lambda model: validation_loss(model, held_out, tokenizer.pad_token_id, 24), every=3,
                            higher_is_better=True)
    return train(lambda: with_dropout(kit.student()), objective, objective.make_params(case.params), data, settings,
                 seed=3, teacher=kit.teacher(), observer=StopAfter(stop), validation=validation,
                 resume_dir=resume_dir, checkpoint_every=2)


def comparable(stats: TrainStats) -> dict[str, Any]:
    """The stats an interruption must not change (time and the resume record may differ)."""
    return {k: v for k, v in dataclasses.asdict(stats).items() if k not in ("seconds", "resumed_at")}


def case_id(case: Case) -> str:
    return f"{case.method}-{case.settings['engine']}{case.settings.get('zero_stage', '')}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_stopped_stage_resumes_to_the_uninterrupted_result(kdbench_kit: TinyKit, tmp_path: Path, case: Case) -> None:
    """Stopped after each of ``case.stops`` and called again, the stage continues from its last checkpoint (every
    2 steps) and ends with exactly the weights, losses, validation curve, selection and counters of a run that was
    never stopped and never checkpointed."""
    reference_model, reference = run_stage(kdbench_kit, case, None, None)
    checkpointed = [(stop - 1) // 2 * 2 for stop in case.stops]  # stopped before its own step's checkpoint
    for stop, step in zip(case.stops, checkpointed):
        with pytest.raises(Interrupted):
            run_stage(kdbench_kit, case, tmp_path / "resume", stop)
        assert latest_checkpoint(tmp_path / "resume").name == f"step-{step:09d}"
    model, stats = run_stage(kdbench_kit, case, tmp_path / "resume", None)
    assert stats.resumed_at == checkpointed  # it did not start over
    assert comparable(stats) == comparable(reference)
    assert reference.selected_step == 3 and len(reference.validation) == 3  # early weights handed on
    assert reference.student_samples > 0 or case.method == "kd"
    want = reference_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    assert latest_checkpoint(tmp_path / "resume").name == f"step-{STEPS:09d}"  # the final one, kept alone
    assert [p.name for p in (tmp_path / "resume").iterdir()] == [f"step-{STEPS:09d}"]


def test_a_checkpoint_from_another_launch_is_refused(kdbench_kit: TinyKit, tmp_path: Path) -> None:
    """A checkpoint whose run had another length cannot be continued exactly: the stage stops with a message
    naming the folder to delete, instead of training on from it."""
    from kdbench.errors import KdbenchError

    case = Case("kd", {}, {"engine": "accelerate"}, ())
    with pytest.raises(Interrupted):
        run_stage(kdbench_kit, case, tmp_path / "resume", 3)
    longer = dataclasses.replace(case, settings={**case.settings, "max_steps": STEPS + 2})
    with pytest.raises(KdbenchError, match="delete .*resume"):
        run_stage(kdbench_kit, longer, tmp_path / "resume", None)


class RunsCode:
    """What a tampered checkpoint could hold: unpickling it calls ``os.mkdir`` (any function would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_a_deepspeed_checkpoint_is_read_weights_only(kdbench_kit: TinyKit, tmp_path: Path) -> None:
    """DeepSpeed's engine state (its ZeRO optimizer shards) is read back with ``weights_only=True``: a checkpoint file
    replaced by a pickle that runs code is refused, with the folder to delete, and the code never runs."""
    from kdbench.errors import KdbenchError

    case = Case("kd", {}, {"engine": "deepspeed", "zero_stage": 1}, ())
    with pytest.raises(Interrupted):
        run_stage(kdbench_kit, case, tmp_path / "resume", 3)
    [shard] = (tmp_path / "resume").glob("step-*/engine/**/*optim_states.pt")
    torch.save({"optimizer_state_dict": RunsCode(tmp_path / "ran")}, shard)
    with pytest.raises(KdbenchError, match=r"holds GLOBAL posix.mkdir, which kdbench does not unpickle.*Delete .*resume"):
        run_stage(kdbench_kit, case, tmp_path / "resume", None)
    assert not (tmp_path / "ran").exists()


# -- killed `kdbench run` processes ------------------------------------------------------------------------

EXPERIMENT = """
name: resume
protocol: uniform
data: {dataset: tiny, options: {n_train: 300, n_validation: 10, n_test: 24}, max_length: 64, max_prompt_length: 48}
models: {scale: tiny, families: [gpt2]}
teacher: {training: {engine: deepspeed, zero_stage: 1, lr: 3.0e-3, batch_size: 32, max_steps: 8}}
init: {training: {engine: deepspeed, zero_stage: 1, lr: 5.0e-3, batch_size: 32, max_steps: 6}}
training: {engine: deepspeed, zero_stage: 1, lr: 5.0e-3, batch_size: 32, max_steps: 8}
selection: {every: 4}
checkpoint_every: 2
methods: {kd: {kd_ratio: 0.5}, minillm: {rollout_batches: 2, inner_epochs: 2}}
teacher_generations: {max_new_tokens: 12, batch_size: 100}
evaluation: {seeds: [10], max_new_tokens: 12, batch_size: 24}
"""


def kdbench_run(root: Path, out: str, env: dict[str, str], kill_when: Callable[[], bool] | None = None) -> str | None:
    """``kdbench run`` of the experiment into ``root/out``: its exit status checked and its output returned; with
    ``kill_when``, SIGKILLed as soon as that holds instead (None returned; the test fails if the run ends first).
    The output goes to a file: a pipe nobody reads while the run goes on could fill up and stall it."""
    command = [sys.executable, "-m", "kdbench", "run", "-e", str(root / "resume.yaml"), "--out", str(root / out)]
    log = root / f"{out}.log"
    with log.open("w") as output, subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT) as run:
        deadline = time.monotonic() + 900
        while kill_when is not None and not kill_when():
            assert run.poll() is None, f"the run ended before its kill point:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.005)
        if kill_when is not None:
            os.kill(run.pid, signal.SIGKILL)
        status = run.wait(timeout=900)
    if kill_when is not None:
        return None
    assert status == 0, log.read_text()[-3000:]
    return log.read_text()


def stage_keys(root: Path, env: dict[str, str]) -> dict[str, str]:
    """Training stages' keys by label (``gpt2/teacher``, ``gpt2/s1/init/seed0``, ``gpt2/s1/kd/seed0``, ...)."""
    command = [sys.executable, "-m", "kdbench", "run", "-e", str(root / "resume.yaml"), "--dry-run", "--format", "json"]
    planned = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert planned.returncode == 0, planned.stderr[-3000:]
    return {stage["label"]: stage["key"] for stage in json.loads(planned.stdout)["stages"] if stage["kind"] == "train"}


@pytest.mark.slow
def test_kdbench_run_killed_inside_training_stages_ends_with_the_uninterrupted_metrics(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    """SIGKILL at five points inside the training stages of an off-policy (kd) and an on-policy (minillm) cell —
    right after a checkpoint, mid-way through writing one, twice in one stage, and after the last step before the
    entry is published — each time rerunning the same command: the final run scores every cell exactly as an
    uninterrupted run into another cache and results folder does, its stages record where they resumed, and no
    resume folder is left behind."""
    (tmp_path / "resume.yaml").write_text(EXPERIMENT)
    reference_env = subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "reference-cache"))
    kdbench_run(tmp_path, "reference", reference_env)

    cache = tmp_path / "cache"
    env = subprocess_env(KDBENCH_CACHE_DIR=str(cache))
    keys = stage_keys(tmp_path, env)
    stages = {"teacher": "gpt2/teacher", "init": "gpt2/s1/init/seed0", "kd": "gpt2/s1/kd/seed0",
              "minillm": "gpt2/s1/minillm/seed0"}

    def resume_dir(stage: str) -> Path:
        return cache / ".resume" / "train" / keys[stages[stage]]

    def checkpoint_at(stage: str, step: int) -> Callable[[], bool]:
        return lambda: (resume_dir(stage) / f"step-{step:09d}").is_dir()

    caught_writing: list[bool] = []

    def writing_after(stage: str, step: int) -> Callable[[], bool]:
        """While the checkpoint after ``step`` is being written, when the poll catches that (it is brief); else
        once it has been."""
        def condition() -> bool:
            if checkpoint_at(stage, step)() and (resume_dir(stage) / ".writing").is_dir():
                caught_writing.append(True)
                return True
            return checkpoint_at(stage, step + 2)()
        return condition

    # Each kill lands a few milliseconds after its condition: inside the step that follows a checkpoint, in the
    # middle of writing one, or (minillm's second) after the last step, before the trained entry is published.
    kill_points = [checkpoint_at("teacher", 4), writing_after("init", 2), checkpoint_at("kd", 6),
                   checkpoint_at("minillm", 2), checkpoint_at("minillm", 8)]
    for kill_when in kill_points:
        kdbench_run(tmp_path, "out", env, kill_when)
    kdbench_run(tmp_path, "out", env)

    def results(out: str) -> dict[str, dict[str, Any]]:
        return {str(path.relative_to(tmp_path / out)): json.loads(path.read_text())
                for path in (tmp_path / out).glob("cells/**/result.json")}

    got, want = results("out"), results("reference")
    assert sorted(got) == sorted(want) and len(got) == 3  # the teacher, kd and minillm cells
    for cell, result in want.items():
        assert got[cell]["status"] == "ok"
        for field in ("metrics", "per_task", "validation", "selected_step", "tokens", "forward_passes"):
            assert got[cell][field] == result[field], (cell, field)
    # Where each stage continued: a half-written checkpoint is passed over for the one before it.
    resumed_at = {"teacher": [[4]], "init": [[2], [4]] if caught_writing else [[4]], "kd": [[6]], "minillm": [[2, 8]]}
    for stage, label in stages.items():
        entry, reference_entry = (root / "train" / keys[label] for root in (cache, tmp_path / "reference-cache"))
        assert json.loads((entry / "train_stats.json").read_text())["resumed_at"] in resumed_at[stage], stage
        assert (entry / "train_log.jsonl").read_text() == (reference_entry / "train_log.jsonl").read_text()
        assert (entry / "model.safetensors").read_bytes() == (reference_entry / "model.safetensors").read_bytes()
    assert not any((cache / ".resume" / "train").iterdir())  # each deleted once its entry was complete
