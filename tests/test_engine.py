"""The training engine: loss normalisation, the kd_ratio mix and real (tiny) training runs."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdbench.config import TrainingConfig
from kdbench.contracts import Sequences
from kdbench.data import TokenizedExample, collate
from kdbench.objectives import GOLD, Objective, ObjectiveParams
from kdbench.registry import load_registries
from kdbench.tinysuite import TinySuiteOptions, generate
from kdbench.train.engine import TrainingData, batch_loss_sums, loss_scale, lr_lambda, total_optimizer_steps, train
from kdbench.train.step import StepPlan, plan_step
from kdbench.zoo import TinyArch, build_tiny_model, load_model
from kdbench_plugins.families import OPT
from kdbench_plugins.kd import KD
from kdbench_plugins.sft import SFT


def data(setup: dict, examples: list[TokenizedExample] | None = None, **overrides: object) -> TrainingData:
    tokenizer = setup["tokenizer"]
    return TrainingData(setup["examples"] if examples is None else examples, tokenizer.pad_token_id,
                        tokenizer.eos_token_id, **overrides)  # type: ignore[arg-type]


def gold(examples: list[TokenizedExample], pad_id: int) -> Sequences:
    return Sequences.collate(examples, pad_id, torch.device("cpu"))


def planned(objective: type[Objective], params: ObjectiveParams) -> StepPlan:
    return plan_step(objective, params, load_registries().sources, settings())


def settings(**overrides: object) -> TrainingConfig:
    values: dict = {"engine": "accelerate", "lr": 3e-3, "batch_size": 16, "max_steps": 4, "warmup_steps": 1}
    values.update(overrides)
    return TrainingConfig(**values)


def test_loss_scale_makes_accumulated_gradient_equal_global_token_mean(tiny_setup: dict) -> None:
    """Two micro-batches with different response lengths: after the engine's ÷grad_accum, the
    accumulated gradient equals that of the token mean over both batches together (not the mean of
    per-batch means, which over-weights the short batch)."""
    tokenizer, examples = tiny_setup["tokenizer"], tiny_setup["examples"]
    by_length = sorted(examples, key=lambda e: len(e.input_ids) - e.prompt_length)
    short, long = by_length[:4], by_length[-4:]
    model = load_model(str(tiny_setup["root"] / "student"))
    params = SFT.make_params({})
    batches = [gold(short, tokenizer.pad_token_id), gold(long, tokenizer.pad_token_id)]
    counts = [b.response_tokens() for b in batches]
    assert counts[0] != counts[1]

    def ce(batch: Sequences) -> torch.Tensor:
        return batch_loss_sums(model, SFT, params, planned(SFT, params), {GOLD: batch}, None).ce

    model.zero_grad()
    scale = loss_scale(world_size=1, grad_accum=2, global_response_tokens=sum(counts))
    for batch in batches:
        (ce(batch) * scale / 2).backward()  # /2: accelerate's ÷grad_accum
    accumulated = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    total = sum(ce(b) for b in batches) / sum(counts)
    total.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    for got, want in zip(accumulated, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    model.zero_grad()  # the per-micro-batch mean is measurably different: the test can fail
    per_batch = sum(ce(b) / c for b, c in zip(batches, counts)) / 2
    per_batch.backward()
    assert any(not torch.allclose(p.grad, r, rtol=1e-3) for p, r in zip(model.parameters(), reference))


def test_batch_loss_sums_split_gold_ce_and_objective_term(tiny_setup: dict) -> None:
    """Σ gold CE and Σ objective loss over response tokens, each computed independently here; with
    kd_ratio 0 the objective term is skipped; an objective reading another source (seqkd's teacher
    text) is scored on that source's sequences while CE stays on the gold ones."""
    import torch.nn.functional as F

    from kdbench_plugins.seqkd import SeqKD

    tokenizer, examples = tiny_setup["tokenizer"], tiny_setup["examples"]
    student = load_model(str(tiny_setup["root"] / "student"))
    teacher = load_model(str(tiny_setup["root"] / "teacher"))
    gold_batch = collate(examples[:6], tokenizer.pad_token_id)
    gold_sequences, other = gold(examples[:6], tokenizer.pad_token_id), gold(examples[6:12], tokenizer.pad_token_id)

    def sums(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["response_mask"][:, 1:]
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        ce = F.cross_entropy(logits[mask], batch["input_ids"][:, 1:][mask], reduction="sum")
        kd = -(F.softmax(target_logits[mask], -1) * F.log_softmax(logits[mask], -1)).sum()
        return ce, kd

    with torch.no_grad():
        kd = KD.make_params({})
        sums_kd = batch_loss_sums(student, KD, kd, planned(KD, kd), {GOLD: gold_sequences}, teacher)
        want_ce, want_kd = sums(gold_batch)
        torch.testing.assert_close(sums_kd.ce, want_ce, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sums_kd.objective, want_kd, rtol=1e-5, atol=1e-4)
        assert (sums_kd.student_forwards, sums_kd.teacher_forwards) == (1, 1)  # one gold pass serves both terms
        seqkd = SeqKD.make_params({"word_kd": True})
        sums_t = batch_loss_sums(student, SeqKD, seqkd, planned(SeqKD, seqkd), {GOLD: gold_sequences, "teacher_text": other},
                                 teacher)
        torch.testing.assert_close(sums_t.ce, want_ce, rtol=1e-5, atol=1e-4)
        other_ce, other_kd = sums(collate(examples[6:12], tokenizer.pad_token_id))
        torch.testing.assert_close(sums_t.objective, 0.5 * other_ce + 0.5 * other_kd, rtol=1e-5, atol=1e-4)
        assert (sums_t.student_forwards, sums_t.teacher_forwards) == (2, 1)  # the teacher runs on the text it scores
        ce_only = KD.make_params({"kd_ratio": 0.0})
        assert batch_loss_sums(student, KD, ce_only, planned(KD, ce_only), {GOLD: gold_sequences}, None).objective == 0


def test_loss_scale_accounts_for_ranks_and_accumulation() -> None:
    assert loss_scale(4, 2, 100) == pytest.approx(0.08)
    assert loss_scale(1, 1, 0) == 1.0  # an all-prompt step gives zero loss, not a division error


def test_lr_schedule_warms_up_then_decays_to_floor() -> None:
    config = settings(warmup_steps=10, min_lr_ratio=0.1, max_steps=100)
    factor = lr_lambda(config, 100)
    assert factor(0) < factor(5) < factor(9) <= 1.0
    assert factor(10) == pytest.approx(1.0)
    assert factor(99) == pytest.approx(0.1, abs=0.01)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 99))


def test_total_steps_from_epochs_counts_accumulation_and_ranks() -> None:
    config = settings(max_steps=None, epochs=2.0, batch_size=10, grad_accum=2)
    assert total_optimizer_steps(config, n_examples=100, world_size=1) == 10
    assert total_optimizer_steps(config, n_examples=100, world_size=2) == 5


@pytest.mark.slow
@pytest.mark.parametrize("engine,zero_stage", [("accelerate", 0), ("deepspeed", 1), ("deepspeed", 3)])
def test_kd_training_runs_and_lowers_the_loss(tiny_setup: dict, tmp_path: Path, engine: str, zero_stage: int) -> None:
    """Real training through accelerate and DeepSpeed (ZeRO 1 and 3 on CPU/gloo): the loss falls,
    the teacher is run once per micro-batch, and the trained model reloads with from_pretrained."""
    tokenizer = tiny_setup["tokenizer"]
    student = load_model(str(tiny_setup["root"] / "student"))
    teacher = load_model(str(tiny_setup["root"] / "teacher"))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    config = settings(engine=engine, zero_stage=zero_stage, max_steps=12, batch_size=16, grad_accum=2, lr=1e-2)
    model, stats = train(student, KD, KD.make_params({}), data(tiny_setup), config, 0, teacher,
                         save_to=tmp_path / "trained", tokenizer=tokenizer)
    losses = [r["loss"] for r in stats.log]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert stats.student_forwards == 24 and stats.teacher_forwards == 24
    assert stats.response_tokens > 0 and stats.tokens > stats.response_tokens
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    changed = [n for n, p in reloaded.named_parameters() if not torch.allclose(p, before[n])]
    assert changed, "training did not change any saved weight"


def test_sft_never_runs_the_teacher(tiny_setup: dict) -> None:
    student = load_model(str(tiny_setup["root"] / "student"))
    teacher = load_model(str(tiny_setup["root"] / "teacher"))
    _, stats = train(student, SFT, SFT.make_params({}), data(tiny_setup), settings(max_steps=2), 0, teacher)
    assert stats.teacher_forwards == 0 and stats.student_forwards == 2


def test_opt_family_builds_and_trains(tiny_setup: dict, tmp_path: Path) -> None:
    tokenizer = tiny_setup["tokenizer"]
    build_tiny_model(OPT, TinyArch(16, 1, 1), tokenizer, 64, 0, tmp_path / "opt")
    student = load_model(str(tmp_path / "opt"))
    assert student.config.model_type == "opt"
    _, stats = train(student, SFT, SFT.make_params({}), data(tiny_setup), settings(max_steps=3), 0)
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in stats.log])))


@pytest.mark.slow
def test_deepspeed_and_plain_accelerate_follow_the_same_trajectory(tiny_setup: dict) -> None:
    """ZeRO-1 in fp32 on one process is plain AdamW: the same seed must give the same losses step for
    step (clipping, LR schedule and normalisation included), so the engine choice changes no result."""
    losses = {}
    for engine in ("accelerate", "deepspeed"):
        student = load_model(str(tiny_setup["root"] / "student"))
        config = settings(engine=engine, zero_stage=1, max_steps=15, batch_size=16, grad_accum=2, lr=1e-2, grad_clip=0.5)
        _, stats = train(student, SFT, SFT.make_params({}), data(tiny_setup), config, 3)
        losses[engine] = [r["loss"] for r in stats.log]
    torch.testing.assert_close(torch.tensor(losses["deepspeed"]), torch.tensor(losses["accelerate"]), rtol=2e-3, atol=2e-3)


def test_logged_loss_is_the_kd_ratio_mix_of_token_means(tiny_setup: dict) -> None:
    """One step over exactly one batch: the logged loss (taken before the update) equals
    (1 − r)·mean CE + r·mean KD over all response tokens, computed here independently."""
    import torch.nn.functional as F

    tokenizer, examples = tiny_setup["tokenizer"], tiny_setup["examples"][:16]
    student = load_model(str(tiny_setup["root"] / "student"))
    teacher = load_model(str(tiny_setup["root"] / "teacher"))
    batch = collate(examples, tokenizer.pad_token_id)
    mask = batch["response_mask"][:, 1:]
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        target = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    ce = F.cross_entropy(logits, batch["input_ids"][:, 1:][mask])
    kd = -(F.softmax(target, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
    _, stats = train(student, KD, KD.make_params({"kd_ratio": 0.3}), data(tiny_setup, examples), settings(max_steps=1),
                     0, teacher)
    assert stats.log[0]["loss"] == pytest.approx(float(0.7 * ce + 0.3 * kd), rel=1e-4)


def test_student_samples_continue_the_prompt_and_end_with_eos(tiny_setup: dict) -> None:
    from kdbench.train.generation import sample_continuations

    tokenizer, examples = tiny_setup["tokenizer"], tiny_setup["examples"][:8]
    student = load_model(str(tiny_setup["root"] / "student"))
    student.train()
    samples = sample_continuations(student, examples, 6, tokenizer.eos_token_id, tokenizer.pad_token_id, 64,
                                   torch.Generator().manual_seed(0))
    assert student.training  # the training mode is given back
    for example, sample in zip(examples, samples):
        assert sample.prompt_length == example.prompt_length
        assert sample.input_ids[: sample.prompt_length] == example.input_ids[: example.prompt_length]
        response = sample.input_ids[sample.prompt_length:]
        assert 1 <= len(response) <= 7 and response[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in response[:-1]


def test_dpkd_pairs_teacher_text_with_fresh_student_samples(tiny_setup: dict) -> None:
    """A real dpkd run: each micro-batch samples the student anew, the teacher scores both sides, and
    the loss is finite; with 2 steps × 2 micro-batches of 8 prompts, 32 samples are drawn."""
    from kdbench_plugins.dpkd import DPKD

    examples = tiny_setup["examples"]
    # Stand-ins for stored teacher samples: each prompt with another example's response.
    teacher_text = [TokenizedExample((e.input_ids[: e.prompt_length] + other.input_ids[other.prompt_length:])[:64],
                                     e.prompt_length) for e, other in zip(examples, reversed(examples))]
    student = load_model(str(tiny_setup["root"] / "student"))
    teacher = load_model(str(tiny_setup["root"] / "teacher"))
    _, stats = train(student, DPKD, DPKD.make_params({}), data(tiny_setup, teacher_texts=teacher_text,
                                                               sample_max_new_tokens=6),
                     settings(max_steps=2, batch_size=8, grad_accum=2), 0, teacher)
    assert stats.student_samples == 32
    assert stats.teacher_forwards == 8 and stats.student_forwards == 12
    assert all(math.isfinite(r["loss"]) for r in stats.log)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"teacher_mix": 0.0, "ppo_clip": 0.0, "single_step": False}])
def test_minillm_collects_rollouts_and_reuses_them_for_inner_epochs(tiny_setup: dict, overrides: dict) -> None:
    """A real minillm run: one collection of 2 micro-batches of rollouts serves 2 inner epochs
    (4 micro-batches = 2 steps with grad_accum 2), then a second collection; the loss is finite and
    moves, including with the ablation switches off."""
    from kdbench_plugins.minillm import MiniLLM

    student = load_model(str(tiny_setup["root"] / "student"))
    teacher = load_model(str(tiny_setup["root"] / "teacher"))
    params = MiniLLM.make_params({"inner_epochs": 2, "rollout_batches": 2, **overrides})
    _, stats = train(student, MiniLLM, params, data(tiny_setup, sample_max_new_tokens=6),
                     settings(max_steps=4, batch_size=8, grad_accum=2), 0, teacher)
    assert stats.student_samples == 2 * 2 * 8  # two collections of 2 micro-batches of 8 prompts
    losses = [r["loss"] for r in stats.log]
    assert all(math.isfinite(v) for v in losses) and len(set(losses)) == 4
    assert stats.teacher_forwards == 8


def test_gradient_checkpointing_trains_the_same_model(tiny_setup: dict) -> None:
    """Recomputing activations in backward changes memory, not the math: the same seed gives the same
    loss trajectory, and the model gives its KV cache back for sampling afterwards."""
    root, examples = tiny_setup["root"], tiny_setup["examples"]
    def checkpointing_on(model: torch.nn.Module) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())

    class Watch:  # an observer that records whether checkpointing was on while the steps ran
        def __init__(self, model: torch.nn.Module) -> None:
            self.model, self.seen = model, set()

        def kdbench_on_stage_start(self, stage: str, total: int | None) -> None: ...

        def kdbench_on_step_end(self, stage: str, step: int, metrics: dict) -> None:
            self.seen.add(checkpointing_on(self.model))

    runs = {}
    for checkpointing in (False, True):
        student = load_model(str(root / "student"))
        watch = Watch(student)
        model, stats = train(student, SFT, SFT.make_params({}), data(tiny_setup, examples),
                             settings(gradient_checkpointing=checkpointing, max_steps=12, lr=1e-2), 0, observer=watch)
        runs[checkpointing] = [r["loss"] for r in stats.log]
        assert watch.seen == {checkpointing}
        assert not checkpointing_on(model)
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)
    assert runs[True][-1] < runs[True][0] - 0.1  # it did train


def test_tensorboard_tracker_logs_every_optimizer_step(tiny_setup: dict, tmp_path: Path) -> None:
    """accelerate's TensorBoard tracker writes the loss and learning rate of each step under the run's name."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdbench.train.engine import Tracking

    root, examples = tiny_setup["root"], tiny_setup["examples"]
    tracking = Tracking(("tensorboard",), str(tmp_path), "gpt2/s1/sft/seed0", {"objective": "sft", "training.lr": 3e-3})
    _, stats = train(load_model(str(root / "student")), SFT, SFT.make_params({}), data(tiny_setup, examples), settings(),
                     0, tracking=tracking)
    runs = [path.parent for path in tmp_path.rglob("events.out.tfevents.*")]
    assert runs and all(str(run).startswith(str(tmp_path / "gpt2/s1/sft/seed0")) for run in runs)
    events = EventAccumulator(str(tmp_path / "gpt2/s1/sft/seed0"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in stats.log]
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3, 4]


def test_a_student_loader_runs_under_zero3_partitioning(tiny_setup: dict, tmp_path: Path) -> None:
    """Given a loader instead of a model, the engine loads the student once DeepSpeed ZeRO-3 is configured,
    so from_pretrained partitions the weights as it reads them; the gathered result saves and reloads."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    tokenizer, loaded_under_zero3 = tiny_setup["tokenizer"], []

    def load_student() -> torch.nn.Module:
        loaded_under_zero3.append(is_deepspeed_zero3_enabled())
        return load_model(str(tiny_setup["root"] / "student"))

    config = settings(engine="deepspeed", zero_stage=3, max_steps=3)
    _, stats = train(load_student, SFT, SFT.make_params({}), data(tiny_setup), config, 0,
                     save_to=tmp_path / "trained", tokenizer=tokenizer)
    assert loaded_under_zero3 == [True] and len(stats.log) == 3
    assert not is_deepspeed_zero3_enabled()  # later plain loads in the grid get whole models again
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    assert reloaded.num_parameters() == load_model(str(tiny_setup["root"] / "student")).num_parameters()


def test_a_stage_leaves_the_process_as_it_found_it(tiny_setup: dict) -> None:
    """Training under DeepSpeed with its own thread count, and sampled evaluation, change process-wide state
    only inside: the environment, torch's generator and thread count, accelerate's state and the caller's
    tokenizer are as they were afterwards."""
    from accelerate.state import AcceleratorState, PartialState
    from transformers.integrations import is_deepspeed_zero3_enabled

    from kdbench.train.generation import generate_responses

    tokenizer = tiny_setup["tokenizer"]
    environment, rng, threads = dict(os.environ), torch.get_rng_state(), torch.get_num_threads()
    side = tokenizer.padding_side
    student = load_model(str(tiny_setup["root"] / "student"))
    model, _ = train(student, SFT, SFT.make_params({}), data(tiny_setup),
                     settings(engine="deepspeed", zero_stage=3, threads=1, max_steps=2), 0)
    records = generate(TinySuiteOptions(n_train=10, n_validation=2, n_test=4, list_towns=(3, 5)))["test"]
    first = generate_responses(model, tokenizer, records, "10", 8, 4)
    assert dict(os.environ) == environment  # no launcher variables, no DS_ACCELERATOR, no ACCELERATE_* left behind
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert AcceleratorState._shared_state == {} and PartialState._shared_state == {}
    assert not is_deepspeed_zero3_enabled()
    assert tokenizer.padding_side == side
    assert generate_responses(model, tokenizer, records, "10", 8, 4) == first  # the seed alone decides the draws


def test_a_plugin_source_feeds_the_objective_like_a_built_in_one(tiny_setup: dict) -> None:
    """A source registered by a plugin: the engine asks it for every micro-batch's sequences and the objective
    reads them. Serving the gold sequences under another name, it gives kd's exact loss trajectory (one more
    student pass per micro-batch: the engine runs each source read)."""
    from kdbench.contracts import SequenceSource
    from kdbench.objectives import Need
    from kdbench_plugins.sources import Gold

    calls: list[list[int]] = []

    class GoldAgain(SequenceSource):
        name, summary = "gold-again", "the gold sequences, counted"

        def sequences(self, prompts: list[int]) -> Sequences:
            calls.append(prompts)
            return Sequences.collate([self.context.gold[i] for i in prompts], self.context.pad_id, self.context.device)

    class KDOnGoldAgain(KD):
        name, reads, needs = "kd-again", ("gold-again",), frozenset({Need.TEACHER_LOGITS})

        @staticmethod
        def loss(inputs: dict, params: object) -> torch.Tensor:
            return KD.loss({GOLD: inputs["gold-again"]}, params)

    teacher = load_model(str(tiny_setup["root"] / "teacher"))
    config = settings(max_steps=3, batch_size=8, grad_accum=2)
    runs = {}
    for objective in (KD, KDOnGoldAgain):
        student = load_model(str(tiny_setup["root"] / "student"))
        _, stats = train(student, objective, objective.make_params({}), data(tiny_setup), config, 0, teacher,
                         sources={"gold": Gold, "gold-again": GoldAgain})
        runs[objective.name] = stats
    assert len(calls) == 6 and all(len(prompts) == 8 for prompts in calls)  # one call per micro-batch
    assert [r["loss"] for r in runs["kd-again"].log] == [r["loss"] for r in runs["kd"].log]
    assert (runs["kd"].student_forwards, runs["kd-again"].student_forwards) == (6, 12)


def test_selection_hands_on_the_best_validation_step_and_records_the_curve(tiny_setup: dict, tmp_path: Path) -> None:
    """Scored every 2 steps of 8 with a score that peaks at step 4: the stage reports step 4, its curve, and hands
    on exactly the weights a 4-step run of the same schedule ends with (returned and saved alike)."""
    from kdbench.train.engine import Validation

    peak = {2: 1.0, 4: 3.0, 6: 2.0, 8: 0.5}
    calls: list[bool] = []

    def score(model: torch.nn.Module) -> float:
        calls.append(model.training)
        return peak[2 * len(calls)]

    # One learning-rate schedule for both runs: 8 steps' worth of cosine, cut at 4 in the reference.
    schedule = {"max_steps": 8, "warmup_steps": 0, "min_lr_ratio": 1.0}
    selected, stats = train(load_model(str(tiny_setup["root"] / "student")), SFT, SFT.make_params({}), data(tiny_setup),
                            settings(**schedule), seed=0, save_to=tmp_path / "best",
                            tokenizer=tiny_setup["tokenizer"], validation=Validation(score, every=2, higher_is_better=True))
    assert calls == [False] * 4  # scored in eval mode, at steps 2, 4, 6, 8
    assert stats.selected_step == 4 and [p["step"] for p in stats.validation] == [2, 4, 6, 8]
    assert [p["value"] for p in stats.validation] == [1.0, 3.0, 2.0, 0.5] and stats.steps == 8
    reference, _ = train(load_model(str(tiny_setup["root"] / "student")), SFT, SFT.make_params({}), data(tiny_setup),
                         settings(**{**schedule, "max_steps": 4}), seed=0)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "best")
    for name, want in reference.state_dict().items():
        assert torch.equal(selected.state_dict()[name], want), name
        assert torch.equal(saved.state_dict()[name], want), name


def test_selection_by_lowest_loss_and_the_final_rule(tiny_setup: dict) -> None:
    """A lower-is-better score picks its minimum; ``keep_best=False`` records the curve and keeps the last step."""
    from kdbench.train.engine import Validation, validation_loss

    examples = tiny_setup["examples"][:40]
    pad = tiny_setup["tokenizer"].pad_token_id
    losses = iter([2.0, 1.0, 1.5])
    _, by_loss = train(load_model(str(tiny_setup["root"] / "student")), SFT, SFT.make_params({}), data(tiny_setup),
                       settings(max_steps=6), seed=0, validation=Validation(lambda m: next(losses), 2, False))
    assert by_loss.selected_step == 4
    final, stats = train(load_model(str(tiny_setup["root"] / "student")), SFT, SFT.make_params({}), data(tiny_setup),
                         settings(max_steps=6), seed=0,
                         validation=Validation(lambda m: validation_loss(m, examples, pad, 16), 3, False, keep_best=False))
    assert stats.selected_step == 6 and [p["step"] for p in stats.validation] == [3, 6]
    assert stats.validation[-1]["value"] == pytest.approx(validation_loss(final.eval(), examples, pad, 16))


def test_the_pre_training_term_adds_lm_coef_times_its_own_mix(tiny_setup: dict) -> None:
    """One step over one gold batch and one batch of pre-training chunks: the logged loss is the gold CE mean plus
    lm_coef × [(1 − r)·CE + r·word-KD] as token means over the chunks, computed here independently; the teacher
    runs on the chunks only for the word-KD half."""
    import torch.nn.functional as F

    from kdbench.data import tokenize_corpus

    tokenizer, examples = tiny_setup["tokenizer"], tiny_setup["examples"][:16]
    texts = [f"{r.input_ids}" for r in tiny_setup["examples"][:40]]  # any plain text will do
    chunks = tokenize_corpus(texts, tokenizer, 32, max_chunks=16)
    assert len(chunks) == 16 and all(len(c.input_ids) == 32 and c.prompt_length == 0 for c in chunks)
    student = load_model(str(tiny_setup["root"] / "student"))
    teacher = load_model(str(tiny_setup["root"] / "teacher"))

    def token_means(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["response_mask"][:, 1:]
        with torch.no_grad():
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
            target = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        ce = F.cross_entropy(logits, batch["input_ids"][:, 1:][mask])
        return ce, -(F.softmax(target, -1) * F.log_softmax(logits, -1)).sum(-1).mean()

    gold_ce, _ = token_means(collate(examples, tokenizer.pad_token_id))
    lm_ce, lm_kd = token_means(collate(chunks, tokenizer.pad_token_id))
    _, stats = train(student, SFT, SFT.make_params({}), data(tiny_setup, examples, lm_text=chunks),
                     settings(max_steps=1, lm_coef=0.5, lm_kd_ratio=0.25), 0, teacher)
    assert stats.log[0]["loss"] == pytest.approx(float(gold_ce + 0.5 * (0.75 * lm_ce + 0.25 * lm_kd)), rel=1e-4)
    assert stats.teacher_forwards == 1 and stats.student_forwards == 2
