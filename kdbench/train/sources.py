"""Sequence sources: where the sequences of a training step come from, apart from the losses that read them.

A source makes one kind of sequence for a micro-batch of training prompts: the data set's gold
responses, the teacher's stored samples, fresh samples of the student as it is now, rollouts from a
teacher-mixed distribution. Objectives name the sources they read (``Objective.reads``); the engine
asks each for its sequences and hands the loss one ``SequenceView`` per name it reads. Sources are plugins
(``kdbench_register_sequence_sources``): an on-policy fraction or a replay buffer is a new source, not
a new path through the training loop. The built-in ones are in ``kdbench_plugins.sources``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from kdbench.data import TokenizedExample, collate, length_grouped_batches
from kdbench.losses import HeadLogits, Logits
from kdbench.objectives import GOLD, Need, SequenceView

# What a stateful part of a training stage hands a resume checkpoint: plain values (numbers, strings, None,
# lists, tuples, dicts) and tensors only, so that ``torch.load(..., weights_only=True)`` reads it back.
State = dict[str, Any]


@dataclass(frozen=True)
class Sequences:
    """A batch of prompt + response sequences on the training device, as a source hands them over."""

    input_ids: torch.Tensor  # (b, t)
    attention_mask: torch.Tensor  # (b, t)
    response_mask: torch.Tensor  # (b, t) bool: the tokens a loss is taken on (response, EOS included)
    position_ids: torch.Tensor | None = None  # (b, t) for left-padded batches; None: 0, 1, 2, … per row
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)  # (b, t-1) per-token values, aligned with labels
    # When the rows are the data set's own training sequences: their indices into the gold examples, by which
    # stored teacher outputs (kdbench.train.teacher_outputs) are looked up. None for anything sampled or stored.
    rows: tuple[int, ...] | None = None

    @classmethod
    def collate(cls, examples: Sequence[TokenizedExample], pad_id: int, device: torch.device,
                rows: Sequence[int] | None = None) -> Sequences:
        """Right-padded examples, moved to ``device``; ``rows``: their gold indices, when they are gold examples."""
        batch = {name: tensor.to(device) for name, tensor in collate(list(examples), pad_id).items()}
        return cls(batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                   rows=None if rows is None else tuple(rows))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def response_tokens(self) -> int:
        """Tokens a token loss is taken on: response positions that some earlier position predicts."""
        return int(self.response_mask[:, 1:].sum())

    def non_padding_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def state_dict(self) -> State:
        """Its tensors on the CPU, for a resume checkpoint (a source's buffer of sequences)."""
        position_ids = None if self.position_ids is None else self.position_ids.cpu()
        return {"input_ids": self.input_ids.cpu(), "attention_mask": self.attention_mask.cpu(),
                "response_mask": self.response_mask.cpu(), "position_ids": position_ids,
                "extras": {name: tensor.cpu() for name, tensor in self.extras.items()},
                "rows": None if self.rows is None else list(self.rows)}

    @classmethod
    def from_state(cls, state: State, device: torch.device) -> Sequences:
        """The sequences ``state_dict`` saved, on ``device``."""
        position_ids = None if state["position_ids"] is None else state["position_ids"].to(device)
        return cls(state["input_ids"].to(device), state["attention_mask"].to(device), state["response_mask"].to(device),
                   position_ids, {name: tensor.to(device) for name, tensor in state["extras"].items()},
                   None if state.get("rows") is None else tuple(state["rows"]))


def forward_logits(model: torch.nn.Module, sequences: Sequences) -> torch.Tensor:
    """Logits shifted so position i predicts token i+1, (b, t-1, vocab). Left-padded batches (rollouts)
    carry their own ``position_ids``."""
    return model(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask,
                 position_ids=sequences.position_ids).logits[:, :-1]


class StoredTeacher(Protocol):
    """Teacher logits read from storage rather than computed (``kdbench.train.teacher_outputs.TeacherOutputs``)."""

    def logits(self, sequences: Sequences) -> torch.Tensor: ...


def head_logits(model: torch.nn.Module, sequences: Sequences, dtype: torch.dtype | None, bare: bool = False) -> HeadLogits:
    """The logits of ``forward_logits`` not yet made: the last hidden states, shifted alike, and the LM head's weight
    (``fused_head``). The model runs whole, as an engine has wrapped or patched it (the student), asking for the
    logits of no position and for every layer's states, which its backward keeps anyway. A ``bare`` model (the frozen
    teacher) runs only its base model, so that no layer's states but the last outlive the pass."""
    inputs = {"input_ids": sequences.input_ids, "attention_mask": sequences.attention_mask,
              "position_ids": sequences.position_ids}
    if bare:
        hidden = model.base_model(**inputs).last_hidden_state
    else:
        no_position = torch.empty(0, dtype=torch.long, device=sequences.input_ids.device)
        hidden = model(**inputs, logits_to_keep=no_position, output_hidden_states=True).hidden_states[-1]
    return HeadLogits(hidden[:, :-1], plain_head(model).weight, dtype)


def plain_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's LM head (inside an engine's wrapper), which ``fused_head`` needs to be a linear map without bias
    applied to the last hidden states as they are (GPT-2, OPT; not a head that scales or caps its logits)."""
    inner = getattr(model, "module", model)  # DeepSpeed's engine and DDP hold the model as .module
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or any(
            getattr(inner.config, name, None) for name in ("final_logit_softcapping", "logit_scale")):
        raise ValueError(f"fused_head needs an LM head that is a linear map without bias on the last hidden states; "
                         f"{type(inner).__name__} has {type(head).__name__}. Set training.fused_head: false")
    return head


def sequence_view(model: torch.nn.Module, sequences: Sequences, teacher: torch.nn.Module | StoredTeacher | None,
                  head_dtype: torch.dtype | None = None) -> SequenceView:
    """The student run on ``sequences``, aligned with their labels, with the teacher's logits when ``teacher`` is
    given: the frozen teacher run on them, or its stored outputs read for them. With ``head_dtype`` (``fused_head``)
    the student's logits, and a teacher model's, are ``HeadLogits`` to be made in that dtype a piece at a time."""
    student_logits: Logits = (forward_logits(model, sequences) if head_dtype is None  # (b, t-1, vocab)
                              else head_logits(model, sequences, head_dtype))
    teacher_logits: Logits | None = None
    if isinstance(teacher, torch.nn.Module):
        with torch.no_grad():
            teacher_logits = (forward_logits(teacher, sequences) if head_dtype is None
                              else head_logits(teacher, sequences, None, bare=True))
    elif teacher is not None:
        teacher_logits = teacher.logits(sequences)
    return SequenceView(student_logits, sequences.input_ids[:, 1:], sequences.response_mask[:, 1:], teacher_logits,
                        sequences.extras)


class PromptOrder:
    """This process's micro-batches of training prompts, in the stage's data order: length-grouped over
    buckets of ``length_bucket`` batches (1: random batches), reshuffled every epoch from one generator that
    every process seeds alike, each taking its share."""

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, rank: int, world: int,
                 length_bucket: int = 16) -> None:
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator
        self.rank, self.world, self.length_bucket = rank, world, length_bucket
        self.order: list[list[int]] = []

    def next(self) -> list[int]:
        if len(self.order) < self.world:  # every process gets one micro-batch per turn; a new epoch reshuffles
            self.order = length_grouped_batches(self.lengths, self.batch_size, self.generator, self.length_bucket)
            self.order = self.order[: len(self.order) - len(self.order) % self.world]
        turn, self.order = self.order[: self.world], self.order[self.world:]
        return turn[self.rank]

    def state_dict(self) -> State:
        """The position in this epoch's order and the generator that shuffles the next epochs."""
        return {"order": [list(batch) for batch in self.order], "generator": self.generator.get_state()}

    def load_state_dict(self, state: State) -> None:
        self.order = [list(batch) for batch in state["order"]]
        self.generator.set_state(state["generator"])


@dataclass
class SourceContext:
    """What a source may read while a training stage runs."""

    gold: Sequence[TokenizedExample]  # the training prompts with their gold responses (data order indexes these)
    teacher_texts: Sequence[TokenizedExample] | None  # stored teacher samples, index for index (TEACHER_GENERATIONS)
    prompts: PromptOrder
    student: Callable[[], torch.nn.Module]  # the student as it is at this moment (unwrapped from the engine)
    teacher: torch.nn.Module | None  # present when some source or the objective needs it
    device: torch.device
    pad_id: int
    eos_id: int | None
    max_new_tokens: int  # bound on every response sampled from the student during training
    max_length: int  # of a training sequence
    generator: torch.Generator  # the stage's sampling randomness: every draw a source makes comes from here
    counters: Counter[str] = field(default_factory=Counter)  # what sources count ("student_samples"), read into the stats


class SequenceSource:
    """Base class of sequence-source plugins: one instance per training stage and process."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `kdbench plugins`
    version: ClassVar[int] = 1  # bump when the sequences it makes change: it re-keys every stage that reads it
    needs: ClassVar[frozenset[Need]] = frozenset()
    samples_student: ClassVar[bool] = False  # draws from the student: the sample bound joins the stage's key
    drives_prompts: ClassVar[bool] = False  # chooses which prompts come next (rollout reuse); at most one per step
    Options: ClassVar[type | None] = None  # a frozen dataclass of options an objective passes (``source_options``)

    def __init__(self, context: SourceContext, options: Any = None) -> None:
        self.context = context
        self.options = options

    def next_prompts(self) -> list[int]:
        """For ``drives_prompts`` sources: the prompts of the next micro-batch."""
        raise NotImplementedError

    def sequences(self, prompts: list[int]) -> Sequences:
        """The sequences of these prompts (indices into ``context.gold``), on ``context.device``."""
        raise NotImplementedError

    def state_dict(self) -> State:
        """What this source carries from one optimizer step to the next (a buffer of rollouts, a replay queue),
        for a resume checkpoint, in plain values and tensors (``State``). The context's generator and counters
        are saved by the engine; a source that keeps a generator of its own saves it here. Stateless sources
        keep this default."""
        return {}

    def load_state_dict(self, state: State) -> None:
        """Put back what ``state_dict`` returned, into a source freshly made for the same stage."""
        if state:
            raise NotImplementedError(f"source {self.name!r} saved a state but does not define load_state_dict")


class MicroBatches:
    """Each micro-batch of a training stage: its prompts (from the data order, or from the one source
    that drives them), then the sequences of every role (``kdbench.objectives``) for those prompts. A
    source filling two roles is asked once: both roles get the same ``Sequences``."""

    def __init__(self, context: SourceContext, sources: Mapping[str, SequenceSource]) -> None:
        assert GOLD in sources, "every step fills the GOLD role (the CE term)"
        unique = list({id(source): source for source in sources.values()}.values())
        drivers = [source for source in unique if source.drives_prompts]
        assert len(drivers) <= 1, f"only one source may choose the prompts, got {[d.name for d in drivers]}"
        names = [source.name for source in unique]
        assert len(set(names)) == len(names), f"one instance per source, got {names}"
        self.context, self.sources, self.unique = context, sources, unique
        self.driver = drivers[0] if drivers else None

    def next(self) -> dict[str, Sequences]:
        prompts = self.driver.next_prompts() if self.driver is not None else self.context.prompts.next()
        made: dict[int, Sequences] = {}  # by source instance: a sampling source must not draw twice
        for source in self.sources.values():
            if id(source) not in made:
                made[id(source)] = source.sequences(prompts)
        return {role: made[id(source)] for role, source in self.sources.items()}

    def state_dict(self) -> State:
        """Everything the micro-batches still to come depend on: the data order and its position, the sources'
        generator and counters, and each source's own state, by source name."""
        context = self.context
        return {"prompts": context.prompts.state_dict(), "generator": context.generator.get_state(),
                "counters": dict(context.counters),
                "sources": {source.name: source.state_dict() for source in self.unique}}

    def load_state_dict(self, state: State) -> None:
        context = self.context
        context.prompts.load_state_dict(state["prompts"])
        context.generator.set_state(state["generator"])
        context.counters.clear()
        context.counters.update(state["counters"])
        for source in self.unique:
            source.load_state_dict(state["sources"][source.name])

