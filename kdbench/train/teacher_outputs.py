"""The teacher's next-token distributions on the gold training sequences, computed once per teacher and read by
every teacher-forced stage of a grid instead of a teacher forward pass per step (docs/design.md, "The grid
is a graph of stages": the teacher-outputs stage).

What is stored, per response position of every training example (the positions a loss is taken on):
- exact (``top_k`` None): the teacher's log-probabilities over the whole vocabulary, fp32. A loss reading them
  gets the teacher's logits up to a constant per position, which no divergence or temperature sees, so the
  stage trains as with the teacher at hand but for the rounding of a forward pass in other batch shapes.
- top-k: the ``k`` most probable tokens with their exact log-probabilities, and the rest of the mass spread
  evenly over the other ``vocab − k`` tokens (DistillKit's and TRL's way of serving a teacher). Divergences
  then see the head exactly and a flat tail; ``benchmarks/grid_sharing.py`` measures what that does to scores.

Positions where no loss is taken read as uniform (all zeros): finite, and masked out by the runner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kdbench.contracts import Sequences
from kdbench.data import TokenizedExample
from kdbench.runtime.watchdog import progress
from kdbench.train.sources import forward_logits

FILE = "teacher_outputs.safetensors"
TAIL_FLOOR = 1e-12  # least tail mass per position: the tail's log-probability stays finite for reverse KL


def loss_positions(example: TokenizedExample) -> int:
    """How many shifted logits of ``example`` a loss is taken on: its response tokens, EOS included, that some earlier
    position predicts (as ``Sequences.response_tokens`` counts them for a batch)."""
    return len(example.input_ids) - max(example.prompt_length, 1)


@dataclass(frozen=True)
class TeacherOutputs:
    """Stored teacher distributions, one row per loss position; example ``i``'s rows are
    ``offsets[i]:offsets[i + 1]``, in position order."""

    offsets: torch.Tensor  # (n + 1,) int64
    logprobs: torch.Tensor  # (rows, k) float32; k = vocab_size when exact
    indices: torch.Tensor | None  # (rows, k) int32 token ids of the kept entries; None when exact
    vocab_size: int

    @property
    def exact(self) -> bool:
        return self.indices is None

    @property
    def top_k(self) -> int | None:
        return None if self.exact else int(self.logprobs.shape[1])

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def nbytes(self) -> int:
        tensors = (self.offsets, self.logprobs) + (() if self.indices is None else (self.indices,))
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense(self, rows: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Log-probabilities (len(rows), vocab) of the stored rows ``rows`` (int64 indices), made on ``device``: only
        the kept entries travel there, the full width is written where it is used."""
        values = self.logprobs[rows].to(device).float()
        if self.indices is None:
            return values
        kept = values.exp().sum(dim=-1, keepdim=True)
        tail = torch.log((1 - kept).clamp(min=TAIL_FLOOR) / (self.vocab_size - values.shape[1]))
        ids = self.indices[rows].to(device).long()
        return tail.expand(len(rows), self.vocab_size).clone().scatter_(1, ids, values)

    def logits(self, sequences: Sequences) -> torch.Tensor:
        """The teacher's (b, t - 1, vocab) log-probabilities for gold ``sequences``, aligned like ``forward_logits``."""
        if sequences.rows is None:
            raise ValueError("stored teacher outputs cover the gold training sequences only; these sequences carry no "
                             "gold example indices (Sequences.rows)")
        mask = sequences.response_mask[:, 1:].cpu()
        # Loss positions taken row by row in position order are the stored rows of those examples in order.
        rows = torch.cat([torch.arange(int(self.offsets[e]), int(self.offsets[e + 1])) for e in sequences.rows])
        if rows.numel() != int(mask.sum()):
            raise ValueError(f"these gold sequences have {int(mask.sum())} loss positions but the stored outputs of "
                             f"examples {list(sequences.rows)[:8]}… have {rows.numel()}: they were computed on other data")
        device = sequences.input_ids.device
        dense = torch.zeros((*mask.shape, self.vocab_size), dtype=torch.float32, device=device)
        dense[mask.to(device)] = self.dense(rows, device)
        return dense

    def save(self, folder: Path) -> None:
        tensors = {"offsets": self.offsets, "logprobs": self.logprobs.contiguous()}
        if self.indices is not None:
            tensors["indices"] = self.indices.contiguous()
        save_file(tensors, str(folder / FILE), metadata={"vocab_size": str(self.vocab_size)})

    @classmethod
    def load(cls, folder: Path) -> TeacherOutputs:
        with safe_open(str(folder / FILE), "pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            return cls(tensors["offsets"], tensors["logprobs"], tensors.get("indices"), int(handle.metadata()["vocab_size"]))


@torch.no_grad()
def compute_teacher_outputs(teacher: torch.nn.Module, examples: Sequence[TokenizedExample], pad_id: int,
                            top_k: int | None, batch_size: int, device: torch.device,
                            on_batch: Callable[[], None] | None = None) -> TeacherOutputs:
    """``teacher`` (eval mode) over every example's gold sequence, its distributions at the loss positions kept
    exactly or as top-k."""
    teacher.eval()
    counts = [loss_positions(example) for example in examples]
    offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    # Batches of like lengths waste little of the forward pass on padding; rows go back to example order after.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    values: list[torch.Tensor | None] = [None] * len(examples)
    kept: list[torch.Tensor | None] = [None] * len(examples)
    vocab_size = int(teacher.config.vocab_size)
    exact = top_k is None or top_k >= vocab_size
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        sequences = Sequences.collate([examples[i] for i in chosen], pad_id, device)
        # (rows, vocab), row-major: example by example, each in position order
        at_loss = torch.log_softmax(forward_logits(teacher, sequences)[sequences.response_mask[:, 1:]].float(), dim=-1)
        vocab_size = int(at_loss.shape[-1])  # the logits' width, which the losses see (it may pad the tokenizer's)
        sizes = [counts[i] for i in chosen]
        if exact:
            pieces, ids = at_loss.cpu().split(sizes), [None] * len(chosen)
        else:
            top = at_loss.topk(min(top_k, vocab_size), dim=-1)  # type: ignore[arg-type]
            pieces, ids = top.values.cpu().split(sizes), top.indices.to(torch.int32).cpu().split(sizes)
        for i, piece, id_piece in zip(chosen, pieces, ids):
            values[i], kept[i] = piece, id_piece
        progress(f"teacher outputs of batch {start // batch_size + 1} of {-(-len(order) // batch_size)}")
        if on_batch is not None:
            on_batch()
    if not examples:
        width = vocab_size if exact else int(top_k)  # type: ignore[arg-type]
        return TeacherOutputs(offsets, torch.zeros((0, width)),
                              None if exact else torch.zeros((0, width), dtype=torch.int32), vocab_size)
    logprobs = torch.cat(values)  # type: ignore[arg-type]
    indices = None if exact else torch.cat(kept)  # type: ignore[arg-type]
    return TeacherOutputs(offsets, logprobs, indices, vocab_size)


def tail_mass(outputs: TeacherOutputs) -> float:
    """Mean probability mass outside the kept tokens (0 when exact)."""
    if outputs.exact or len(outputs.logprobs) == 0:
        return 0.0
    return float((1 - outputs.logprobs.exp().sum(dim=-1)).clamp(min=0).mean())

