"""The runner's side of sequence sources: the models run on a source's sequences, and the micro-batches of a step.

A source (``kdbench.contracts.SequenceSource``) makes one kind of sequence for a micro-batch of training prompts:
the data set's gold responses, the teacher's stored samples, fresh samples of the student as it is now, rollouts
from a teacher-mixed distribution. Objectives name the sources they read (``Objective.reads``); the engine asks
each for its sequences (``MicroBatches``) and hands the loss one ``SequenceView`` per name it reads
(``sequence_view``). Sources are plugins (``kdbench_register_sequence_sources``): an on-policy fraction or a replay
buffer is a new source, not a new path through the training loop. The built-in ones are in ``kdbench_plugins.sources``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from kdbench.contracts import Sequences, SequenceSource, SourceContext, State
from kdbench.losses import HeadLogits, Logits
from kdbench.objectives import GOLD, SequenceView


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

