"""The built-in sequence sources: gold responses, stored teacher text, fresh student samples, an on-policy
fraction of them, and teacher-mixed rollouts. A preference pair is an objective reading two of them
(``dpkd``: teacher text preferred over a student sample). docs/design.md, "Objectives, sequences and
what the runner owns"."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kdbench import hookimpl
from kdbench.contracts import Sequences, SequenceSource, SourceContext, State
from kdbench.objectives import GOLD, Need, gold_cross_entropy
from kdbench.train.generation import mixture_logp, positions_from_mask, sample_continuations, sample_mixture
from kdbench.train.sources import forward_logits


class Gold(SequenceSource):
    name = GOLD
    summary = "the data set's responses"

    def sequences(self, prompts: list[int]) -> Sequences:
        context = self.context
        return Sequences.collate([context.gold[i] for i in prompts], context.pad_id, context.device, rows=prompts)


class TeacherText(SequenceSource):
    name = "teacher_text"
    summary = "one stored teacher sample per training prompt (temperature 1), generated once per teacher and cached"
    needs = frozenset({Need.TEACHER_GENERATIONS})

    def sequences(self, prompts: list[int]) -> Sequences:
        context = self.context
        assert context.teacher_texts is not None, "the runner provides the teacher's generations"
        return Sequences.collate([context.teacher_texts[i] for i in prompts], context.pad_id, context.device)


class StudentSamples(SequenceSource):
    name = "student_samples"
    summary = "a fresh sample of the student as it is at this step, one per prompt (temperature 1)"
    samples_student = True

    def sequences(self, prompts: list[int]) -> Sequences:
        context = self.context
        assert context.eos_id is not None, "sampling the student needs the EOS id"
        samples = sample_continuations(context.student(), [context.gold[i] for i in prompts], context.max_new_tokens,
                                       context.eos_id, context.pad_id, context.max_length, context.generator)
        context.counters["student_samples"] += len(samples)
        return Sequences.collate(samples, context.pad_id, context.device)


@dataclass(frozen=True)
class OnPolicyOptions:
    """Each micro-batch is fresh student samples with probability ``fraction`` (GKD's λ), else gold."""

    fraction: float = 0.5


class OnPolicy(SequenceSource):
    """GKD's on-policy fraction (TRL ``GKDTrainer.training_step``): per micro-batch, one draw from the stage's
    generator decides whether its responses are the student's own samples or the data set's."""

    name = "on_policy"
    summary = "per micro-batch, fresh student samples with probability λ (GKD's on-policy fraction), else gold"
    samples_student = True
    Options = OnPolicyOptions

    def __init__(self, context: SourceContext, options: OnPolicyOptions | None = None) -> None:
        super().__init__(context, options or OnPolicyOptions())
        self.samples, self.gold = StudentSamples(context), Gold(context)

    def sequences(self, prompts: list[int]) -> Sequences:
        sampled = float(torch.rand((), generator=self.context.generator)) < self.options.fraction
        return (self.samples if sampled else self.gold).sequences(prompts)


@dataclass(frozen=True)
class RolloutOptions:
    """``batches`` micro-batches of prompts are sampled from ``(1 − teacher_mix)·q + teacher_mix·p``, then
    trained on for ``inner_epochs`` passes, each pass in a new order. With ``recompute_logp`` the per-token
    log-probabilities are those of full forward passes over the sampled sequences (``recomputed_logp``),
    not the sampler's incremental, KV-cached ones."""

    teacher_mix: float = 0.2
    batches: int = 4
    inner_epochs: int = 4
    recompute_logp: bool = True  # MiniLLM's released sampler does (minillm/minillm/sampler.py:105-115)


@torch.no_grad()
def recomputed_logp(student: torch.nn.Module, teacher: torch.nn.Module, sequences: Sequences,
                    teacher_mix: float) -> dict[str, torch.Tensor]:
    """``old_logp``, ``teacher_logp`` and ``mixture_logp`` of the sampled tokens, (b, t-1) each and 0 off the
    response, from one full forward pass of each model as it is now (its mode included). The student pass
    is the very computation the update's forward repeats (``forward_logits``, then a float log-softmax), so
    at the first inner step ``log q_θ − log q_old`` is exactly 0."""
    labels, mask = sequences.input_ids[:, 1:], sequences.response_mask[:, 1:]  # (b, t-1)
    old = -gold_cross_entropy(forward_logits(student, sequences), labels, mask)  # (b, t-1)
    teacher_logp = -gold_cross_entropy(forward_logits(teacher, sequences), labels, mask)  # (b, t-1)
    mixture = mixture_logp(old, teacher_logp, teacher_mix) * mask
    return {"old_logp": old, "teacher_logp": teacher_logp, "mixture_logp": mixture}


class Rollouts(SequenceSource):
    """Collected in groups with per-token log-probabilities (``old_logp`` of the sampling student,
    ``teacher_logp``, ``mixture_logp``), and reused: this source decides the prompts of each step."""

    name = "rollouts"
    summary = "teacher-mixed rollouts (1−α)·q + α·p with per-token log-probabilities, reused for inner epochs"
    version = 2  # 2: log-probabilities recomputed by full forward passes (RolloutOptions.recompute_logp)
    needs = frozenset({Need.TEACHER_MODEL})
    samples_student = True
    drives_prompts = True
    Options = RolloutOptions

    def __init__(self, context: SourceContext, options: RolloutOptions | None = None) -> None:
        super().__init__(context, options or RolloutOptions())
        self.queue: list[tuple[list[int], Sequences]] = []
        self.current: tuple[list[int], Sequences] | None = None

    def collect(self) -> None:
        context, options = self.context, self.options
        assert context.teacher is not None and context.eos_id is not None
        collected = []
        for _ in range(options.batches):
            prompts = context.prompts.next()
            token_ids = [context.gold[i].input_ids[: context.gold[i].prompt_length] for i in prompts]
            rollout = sample_mixture(context.student(), context.teacher, token_ids, options.teacher_mix,
                                     context.max_new_tokens, context.eos_id, context.pad_id, context.generator)
            not_a_label = torch.zeros_like(rollout.response_mask[:, :1])  # position 0 is predicted by nothing
            sequences = Sequences(
                rollout.input_ids, rollout.attention_mask, torch.cat([not_a_label, rollout.response_mask], dim=1),
                positions_from_mask(rollout.attention_mask),
                {"old_logp": rollout.student_logp, "teacher_logp": rollout.teacher_logp,
                 "mixture_logp": rollout.mixture_logp})
            if options.recompute_logp:
                extras = recomputed_logp(context.student(), context.teacher, sequences, options.teacher_mix)
                sequences = dataclasses.replace(sequences, extras=extras)
            collected.append((prompts, sequences))
            context.counters["student_samples"] += len(prompts)
        for _ in range(options.inner_epochs):
            order = torch.randperm(len(collected), generator=context.generator).tolist()
            self.queue.extend(collected[i] for i in order)

    def next_prompts(self) -> list[int]:
        if not self.queue:
            self.collect()
        self.current = self.queue.pop(0)
        return self.current[0]

    def sequences(self, prompts: list[int]) -> Sequences:
        assert self.current is not None and self.current[0] is prompts
        return self.current[1]

    def state_dict(self) -> State:
        """The rollouts still queued (the current one is used up by the step that drew it). Inner epochs queue
        one collection several times: each rollout is stored once, the queue as indices into them."""
        unique = list({id(sequences): (prompts, sequences) for prompts, sequences in self.queue}.values())
        index = {id(sequences): i for i, (_, sequences) in enumerate(unique)}
        return {"rollouts": [{"prompts": prompts, "sequences": sequences.state_dict()} for prompts, sequences in unique],
                "queue": [index[id(sequences)] for _, sequences in self.queue]}

    def load_state_dict(self, state: State) -> None:
        rollouts = [(list(r["prompts"]), Sequences.from_state(r["sequences"], self.context.device))
                    for r in state["rollouts"]]
        self.queue, self.current = [rollouts[i] for i in state["queue"]], None


@hookimpl
def kdbench_register_sequence_sources() -> list[type[SequenceSource]]:
    return [Gold, TeacherText, StudentSamples, OnPolicy, Rollouts]
