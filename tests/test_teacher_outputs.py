"""Stored teacher outputs: exact and top-k distributions on the gold training sequences, read by the engine in
place of a teacher forward pass, and what they cost."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kdbench.config import TrainingConfig
from kdbench.contracts import Sequences
from kdbench.data import TokenizedExample
from kdbench.train.engine import TrainingData, train
from kdbench.train.sources import forward_logits
from kdbench.train.teacher_outputs import TeacherOutputs, compute_teacher_outputs, loss_positions, tail_mass
from kdbench.zoo import load_model
from kdbench_plugins.dpkd import DPKD
from kdbench_plugins.gkd import GKD
from kdbench_plugins.kd import KD
from kdbench_plugins.rkl import ReverseKL
from kdbench_plugins.seqkd import SeqKD
from kdbench_plugins.sft import SFT

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tiny_setup: dict) -> dict:
    """``tiny_setup``'s data and models, with the ids and the loaded teacher these tests read."""
    tokenizer = tiny_setup["tokenizer"]
    return {**tiny_setup, "pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id,
            "teacher": load_model(str(tiny_setup["root"] / "teacher"))}


def gold_batch(examples: list[TokenizedExample], rows: list[int], pad: int) -> Sequences:
    return Sequences.collate([examples[i] for i in rows], pad, CPU, rows=rows)


def test_exact_outputs_are_the_teachers_log_probabilities_at_every_loss_position(setup: dict) -> None:
    examples, teacher = setup["examples"], setup["teacher"]
    outputs = compute_teacher_outputs(teacher, examples, setup["pad"], None, 64, CPU)
    assert outputs.exact and len(outputs) == len(examples)
    assert int(outputs.offsets[-1]) == sum(loss_positions(e) for e in examples) == outputs.logprobs.shape[0]
    rows = [5, 0, 17, 3]  # another order and batch shape than the one they were computed in
    batch = gold_batch(examples, rows, setup["pad"])
    stored = outputs.logits(batch)
    with torch.no_grad():
        computed = torch.log_softmax(forward_logits(teacher, batch), dim=-1)
    mask = batch.response_mask[:, 1:]
    torch.testing.assert_close(stored[mask], computed[mask], rtol=0, atol=1e-5)
    assert torch.all(stored[~mask] == 0)  # uniform where no loss is taken


def test_top_k_keeps_the_head_exactly_and_spreads_the_rest_of_the_mass_evenly(setup: dict) -> None:
    examples, teacher, k = setup["examples"], setup["teacher"], 8
    exact = compute_teacher_outputs(teacher, examples[:20], setup["pad"], None, 64, CPU)
    top = compute_teacher_outputs(teacher, examples[:20], setup["pad"], k, 64, CPU)
    assert top.top_k == k and top.indices is not None and top.vocab_size == exact.vocab_size
    batch = gold_batch(examples, list(range(20)), setup["pad"])
    mask = batch.response_mask[:, 1:]
    full, approx = exact.logits(batch)[mask], top.logits(batch)[mask]
    head = full.topk(k, dim=-1)
    torch.testing.assert_close(approx.gather(1, head.indices), head.values)  # the head as the teacher has it
    torch.testing.assert_close(approx.exp().sum(-1), torch.ones(len(approx)), rtol=0, atol=1e-5)  # a distribution
    tail = approx.scatter(1, head.indices, float("nan"))  # everything outside the head: one value per position
    values = tail[~tail.isnan()].view(len(approx), -1)
    torch.testing.assert_close(values, values[:, :1].expand_as(values))
    missing = 1 - head.values.exp().sum(-1)
    torch.testing.assert_close(values[:, 0].exp() * (top.vocab_size - k), missing, rtol=1e-4, atol=1e-6)
    assert 0 < tail_mass(top) < 1 and tail_mass(exact) == 0


def test_outputs_survive_a_save_and_load(setup: dict, tmp_path: Path) -> None:
    for top_k in (None, 4):
        outputs = compute_teacher_outputs(setup["teacher"], setup["examples"][:10], setup["pad"], top_k, 4, CPU)
        outputs.save(tmp_path)
        loaded = TeacherOutputs.load(tmp_path)
        assert loaded.vocab_size == outputs.vocab_size and loaded.top_k == top_k
        batch = gold_batch(setup["examples"], [2, 7], setup["pad"])
        assert torch.equal(loaded.logits(batch), outputs.logits(batch))


def test_outputs_refuse_sequences_they_were_not_computed_on(setup: dict) -> None:
    examples = setup["examples"]
    outputs = compute_teacher_outputs(setup["teacher"], examples[:10], setup["pad"], 4, 10, CPU)
    with pytest.raises(ValueError, match="no gold example indices"):
        outputs.logits(Sequences.collate(examples[:2], setup["pad"], CPU))  # sampled or stored text carries no rows
    longer = next(i for i in range(10) if loss_positions(examples[i]) != loss_positions(examples[0]))
    with pytest.raises(ValueError, match="computed on other data"):  # example 0's sequence under another's index
        outputs.logits(Sequences.collate([examples[0]], setup["pad"], CPU, rows=[longer]))


def test_only_objectives_reading_teacher_logits_on_gold_alone_can_share_them() -> None:
    from kdbench.config import TrainingConfig
    from kdbench.registry import load_registries
    from kdbench.train.step import plan_step

    def on_gold(objective: Any, params: dict[str, Any]) -> bool:
        return plan_step(objective, objective.make_params(params), load_registries().sources,
                         TrainingConfig(max_steps=1)).logits_on_gold

    assert on_gold(KD, {}) and on_gold(ReverseKL, {})
    assert not on_gold(SFT, {})  # no teacher term
    assert not on_gold(KD, {"kd_ratio": 0.0})
    assert not on_gold(KD, {"train_on": "teacher_text"})  # logits on teacher samples
    assert not on_gold(GKD, {})  # on student samples part of the time
    assert not on_gold(DPKD, {})
    assert not on_gold(SeqKD, {})


def test_training_on_stored_exact_outputs_follows_the_run_with_the_teacher(setup: dict) -> None:
    """Same seed, same data order: reading the exact stored distributions instead of running the teacher gives
    the same losses step for step (up to the rounding of forward passes in other batch shapes), and no teacher
    forward pass."""
    examples, pad, eos = setup["examples"], setup["pad"], setup["eos"]
    config = TrainingConfig(engine="accelerate", lr=1e-2, batch_size=16, max_steps=10, warmup_steps=1, grad_accum=2)
    outputs = compute_teacher_outputs(setup["teacher"], examples, pad, None, 64, CPU)
    student = str(setup["root"] / "student")
    _, with_teacher = train(load_model(student), KD, KD.make_params({}), TrainingData(examples, pad, eos), config, 0,
                            setup["teacher"])
    _, stored = train(load_model(student), KD, KD.make_params({}), TrainingData(examples, pad, eos, teacher_outputs=outputs),
                      config, 0, None)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in stored.log]),
                               torch.tensor([r["loss"] for r in with_teacher.log]), rtol=1e-4, atol=1e-5)
    assert with_teacher.teacher_forwards == 20 and stored.teacher_forwards == 0
    assert stored.student_forwards == with_teacher.student_forwards == 20
    # a top-k approximation trains differently, but close: the head carries nearly all of a tiny teacher's mass
    _, top = train(load_model(student), KD, KD.make_params({}),
                   TrainingData(examples, pad, eos, teacher_outputs=compute_teacher_outputs(
                       setup["teacher"], examples, pad, 4, 64, CPU)), config, 0, None)
    losses = torch.tensor([r["loss"] for r in top.log])
    assert not torch.allclose(losses, torch.tensor([r["loss"] for r in with_teacher.log]), rtol=1e-6, atol=0)


SHARED_EXPERIMENT = """
name: shared
protocol: uniform
data: {dataset: tiny, options: {n_train: 300, n_validation: 10, n_test: 24}, max_length: 64, max_prompt_length: 48}
models: {scale: tiny, families: [gpt2]}
teacher: {training: {engine: accelerate, lr: 3.0e-3, batch_size: 32, max_steps: 20}}
init: {training: {engine: accelerate, lr: 5.0e-3, batch_size: 32, max_steps: 4}}
training: {engine: accelerate, lr: 5.0e-3, batch_size: 32, max_steps: 6}
selection: {every: 3}
methods: {sft: {}, kd: {}, rkl: {}}
seeds: [0, 1]
teacher_outputs: {share: true, top_k: 8, batch_size: 100}
evaluation: {seeds: [10], max_new_tokens: 16, batch_size: 24}
"""


@pytest.mark.slow
def test_a_shared_grid_computes_the_outputs_once_and_counts_them_in_every_reading_row(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    (tmp_path / "shared.yaml").write_text(SHARED_EXPERIMENT)
    env = subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache"))
    args = [sys.executable, "-m", "kdbench", "run", "-e", str(tmp_path / "shared.yaml"), "--out", str(tmp_path / "out")]
    planned = subprocess.run([*args, "--dry-run", "--format", "json"], capture_output=True, text=True, env=env, timeout=300)
    assert planned.returncode == 0, planned.stderr[-3000:]
    plan = json.loads(planned.stdout)
    [outputs] = [stage for stage in plan["stages"] if stage["kind"] == "teacher_outputs"]
    assert "top 8 tokens" in outputs["work"] and "top 8 tokens" in plan["protocol_card"]["teacher signal"]
    completed = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert [p.name for p in (tmp_path / "cache/teacher_outputs").iterdir()] == [outputs["key"]]  # one, as planned
    stats = json.loads((tmp_path / "cache/teacher_outputs" / outputs["key"] / "stats.json").read_text())
    assert stats["top_k"] == 8 and stats["examples"] > 0 and stats["seconds"] > 0 and 0 < stats["tail_mass"] < 1
    for method in ("kd", "rkl", "sft"):
        for seed in (0, 1):
            result = json.loads((tmp_path / f"out/cells/gpt2/s1/{method}/seed{seed}/result.json").read_text())
            assert result["status"] == "ok" and result["forward_passes"]["teacher"] == 0
            ancestors = result["cost"]["ancestors"]
            # the teacher work a reading row was built on is in its cost; sft never reads it
            assert ("gpt2/teacher/outputs" in ancestors) == (method != "sft")
            if method != "sft":
                assert ancestors["gpt2/teacher/outputs"]["seconds"] == stats["seconds"]
                assert outputs["key"] in result["lineage"]
