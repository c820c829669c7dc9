"""The fused LM head (``training.fused_head``): the losses take hidden states and the head's weight
(``losses.HeadLogits``) and make the logits a piece of positions at a time, in forward and backward. Values and
gradients must be those of the whole logits, the first-step guard must read the same gradient, and training must
follow the unfused run."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from test_losses import CHUNKED, chunk_budget

from kdbench import losses
from kdbench.config import TrainingConfig
from kdbench.contracts import Sequences
from kdbench.losses import HeadLogits
from kdbench.objectives import gold_cross_entropy
from kdbench.train.engine import TrainingData, train
from kdbench.train.sources import plain_head, sequence_view
from kdbench.zoo import load_model
from kdbench_plugins.kd import KD
from kdbench_plugins.minillm import MiniLLM

pytestmark = pytest.mark.slow  # training runs compared step by step

CPU = torch.device("cpu")


def head_inputs(seed: int, batch: int, length: int, width: int, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    return {"hidden": draw(batch, length, width), "weight": draw(vocab, width) / width**0.5,
            "teacher_hidden": draw(batch, length, width + 3), "teacher_weight": draw(vocab, width + 3),
            "weights": torch.rand(batch, length, generator=generator, dtype=torch.float64)}


@pytest.mark.parametrize("name", CHUNKED)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), budget=st.sampled_from([7, 40, 200, 10**9]), masked=st.integers(0, 4))
def test_head_logits_give_the_values_and_gradients_of_the_whole_logits(name: str, seed: int, budget: int,
                                                                        masked: int) -> None:
    """Against the divergence on ``F.linear`` logits made whole: the same values, the same gradients to the hidden
    states and to the head's weight, and the squared gradient to the logits that the guard records."""
    x = head_inputs(seed, 2, 5, 4, 7)
    x["weights"].view(-1)[:masked] = 0
    hidden, weight = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
    teacher = F.linear(x["teacher_hidden"], x["teacher_weight"])
    logits = F.linear(hidden, weight)
    with chunk_budget(10**9):  # logits that fit one piece take the whole-tensor path
        want = CHUNKED[name](logits, teacher)
    want_hidden, want_weight, want_logits = torch.autograd.grad((want * x["weights"]).sum(), [hidden, weight, logits])
    made = HeadLogits(hidden, weight, recording=True)
    with chunk_budget(budget):
        got = CHUNKED[name](made, HeadLogits(x["teacher_hidden"], x["teacher_weight"]))
        got_hidden, got_weight = torch.autograd.grad((got * x["weights"]).sum(), [hidden, weight])
    for a, b in [(got, want), (got_hidden, want_hidden), (got_weight, want_weight)]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.as_tensor(made.gradient_square, dtype=torch.float64),
                               want_logits.square().sum(), rtol=1e-6, atol=1e-12)  # summed in float32


def test_gold_cross_entropy_takes_head_logits_and_masks_alike() -> None:
    x = head_inputs(0, 3, 6, 5, 11)
    labels = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    labels[~mask] = -100  # masked positions may hold anything: they must never be indexed
    hidden = x["hidden"].requires_grad_()
    want = gold_cross_entropy(F.linear(hidden, x["weight"]), labels, mask)
    with chunk_budget(11):  # one position a piece
        got = gold_cross_entropy(HeadLogits(hidden, x["weight"]), labels, mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert bool((got[~mask] == 0).all())
    torch.testing.assert_close(torch.autograd.grad(got.sum(), hidden)[0], torch.autograd.grad(want.sum(), hidden)[0])


def test_sequence_view_hands_on_the_models_own_head_and_hidden_states(tiny_setup: dict) -> None:
    model = load_model(str(tiny_setup["root"] / "student"))
    batch = Sequences.collate(tiny_setup["examples"][:4], tiny_setup["tokenizer"].pad_token_id, CPU)
    plain = sequence_view(model, batch, None)
    fused = sequence_view(model, batch, None, torch.float32)
    assert isinstance(fused.student_logits, HeadLogits) and fused.student_logits.weight is plain_head(model).weight
    assert fused.student_logits.shape == plain.student_logits.shape
    torch.testing.assert_close(F.linear(fused.student_logits.hidden, fused.student_logits.weight), plain.student_logits)
    teacher = load_model(str(tiny_setup["root"] / "teacher"))  # a bare model: its base model alone runs
    made = sequence_view(model, batch, teacher, torch.float32).teacher_logits
    assert isinstance(made, HeadLogits) and not made.hidden.requires_grad
    torch.testing.assert_close(F.linear(made.hidden, made.weight), sequence_view(model, batch, teacher).teacher_logits)


def test_a_head_the_losses_cannot_make_is_refused(tiny_setup: dict) -> None:
    model = load_model(str(tiny_setup["root"] / "student"))
    model.set_output_embeddings(torch.nn.Linear(model.config.n_embd, model.config.vocab_size, bias=True))
    with pytest.raises(ValueError, match="linear map without bias.*fused_head: false"):
        plain_head(model)


def test_the_setting_stays_out_of_every_key_at_its_default_and_refuses_zero_3() -> None:
    assert "fused_head" not in TrainingConfig(max_steps=1).model_dump()  # keys of earlier results unchanged
    assert TrainingConfig(max_steps=1, fused_head=True).model_dump()["fused_head"] is True
    with pytest.raises(ValidationError, match="ZeRO-3"):
        TrainingConfig(max_steps=1, fused_head=True, engine="deepspeed", zero_stage=3)


@pytest.mark.parametrize(("engine", "precision"), [("accelerate", "fp32"), ("accelerate", "bf16"), ("deepspeed", "fp32")])
def test_training_with_the_fused_head_follows_the_unfused_run(tiny_setup: dict, monkeypatch: pytest.MonkeyPatch,
                                                              engine: str, precision: str) -> None:
    """kd, 8 optimizer steps of 2 micro-batches, the logits made one position at a time: the losses step for step and
    the first-step guard's gradient are the unfused run's, up to rounding, under accelerate (fp32 and bf16 autocast)
    and DeepSpeed ZeRO-2; the head's weight (tied to the token embeddings) is trained alike."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 1)
    tokenizer, examples = tiny_setup["tokenizer"], tiny_setup["examples"]
    data = TrainingData(examples, tokenizer.pad_token_id, tokenizer.eos_token_id)
    teacher = load_model(str(tiny_setup["root"] / "teacher"))
    runs = {}
    for fused in (False, True):
        config = TrainingConfig(engine=engine, zero_stage=2, precision=precision, lr=1e-2, batch_size=16, max_steps=8,
                                warmup_steps=1, grad_accum=2, fused_head=fused)
        runs[fused] = train(load_model(str(tiny_setup["root"] / "student")), KD, KD.make_params({}), data, config, 0,
                            teacher)
    (plain_model, plain), (fused_model, fused_stats) = runs[False], runs[True]
    tolerance = {"fp32": 1e-5, "bf16": 2e-2}[precision]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in fused_stats.log]),
                               torch.tensor([r["loss"] for r in plain.log]), rtol=tolerance, atol=tolerance)
    assert fused_stats.first_gradient_rms == pytest.approx(plain.first_gradient_rms, rel=tolerance)
    torch.testing.assert_close(plain_head(fused_model).weight, plain_head(plain_model).weight,
                               rtol=10 * tolerance, atol=10 * tolerance)


def test_an_objective_that_reads_logits_itself_keeps_them_whole(tiny_setup: dict) -> None:
    """minillm reads the logits outside kdbench.losses: with the setting on, its steps still get the whole logits."""
    from kdbench.registry import load_registries
    from kdbench.train.step import plan_step

    def head_dtype(settings: TrainingConfig, objective: Any, params: dict[str, Any]) -> torch.dtype | None:
        return plan_step(objective, objective.make_params(params), load_registries().sources, settings).head_dtype

    on = TrainingConfig(max_steps=1, fused_head=True)
    assert not MiniLLM.fused_head and head_dtype(on, MiniLLM, {}) is None
    assert head_dtype(on, MiniLLM, {"kd_ratio": 0.0}) is torch.float32  # CE term alone
    assert head_dtype(on, KD, {}) is torch.float32
    assert head_dtype(TrainingConfig(max_steps=1), KD, {}) is None
