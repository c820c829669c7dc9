"""The plugin contracts side by side: what an objective, a sequence source and a metric are.

Plugin authors import them from the package (``from kdbench import Objective, SequenceSource, Metric``) and
register them through the hooks of ``kdbench.hookspecs``. ``Objective`` is defined in ``kdbench.objectives``,
beside the parameters, views and needs its loss is written against; a sequence source is defined here with what it
receives (``SourceContext``, whose ``PromptOrder`` is the stage's data order) and what it returns (``Sequences``).
This module sits below the training loop and the evaluation that run plugins, so that the hooks name every
contract without importing either.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kdbench.data import TokenizedExample, collate, length_grouped_batches
from kdbench.objectives import Need, Objective

__all__ = ["Metric", "Objective", "PromptOrder", "SequenceSource", "Sequences", "SourceContext", "State"]

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


@dataclass(frozen=True)
class Metric:
    """A per-example score in [0, 1]; the harness reports its mean over examples × 100."""

    name: str
    description: str
    higher_is_better: bool
    fn: Callable[[str, Sequence[str]], float]
