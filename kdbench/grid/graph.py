"""The stage graph: every node a run would build, its dependencies and its key, as plain data.

A node's key is its cache key: a hash of its kind, the version of the code that builds it, its own
settings (which carry the versions of the objective and sequence sources a training node runs) and
its parents' keys. Bumping any version therefore changes the key of that node and of everything
downstream, and nothing else. Keys are computed from settings alone, so the graph exists before any
stage runs: ``--dry-run`` renders it, an executor runs it, a test checks one against the other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any

from kdbench.config import config_hash


class StageKind(str, Enum):
    """What a node does. Values are the names of the cache folders that hold the built entries."""

    CHECKPOINT = "checkpoint"  # a hub name or local folder (paper scale): nothing to build
    TOKENIZER = "tokenizer"  # a BPE trained on the training split (tiny scale)
    INIT = "init"  # a randomly initialised model written as an HF folder (tiny scale)
    TOKENIZE = "tokenize"  # the training split tokenised for one tokenizer
    TRAIN = "train"  # a model trained with an objective: the teacher's SFT, a shared SFT init, a cell's training
    GENERATE = "generate"  # one stored teacher sample per training prompt
    TEACHER_OUTPUTS = "teacher_outputs"  # the teacher's distributions on the gold training sequences, stored once
    EVAL = "eval"  # a cell: evaluate one model and write its result folder


@dataclass(frozen=True)
class Node:
    """One stage. ``inputs`` are its own settings (JSON-able); ``deps`` maps the role each parent plays
    (``init``, ``data``, ``teacher``, ``texts``, ``outputs``, ``model``, ``tokenizer``) to that parent's key."""

    kind: StageKind
    label: str  # what a person reads: "gpt2/s1/kd/seed0", "gpt2/teacher", "data"
    version: int  # of the stage builder (kdbench.grid.stages)
    inputs: Mapping[str, Any]
    deps: Mapping[str, str]
    family: str | None  # the model family it belongs to; None for data shared by every family
    spec: Any = field(default=None, compare=False, repr=False)  # typed payload for the builder; not part of the key

    @cached_property
    def key(self) -> str:
        return node_key(self.kind, self.version, self.inputs, self.deps)

    def describe(self) -> dict[str, Any]:
        """The node as ``--dry-run --format json`` prints it."""
        return {"key": self.key, "kind": self.kind.value, "label": self.label, "deps": list(self.deps.values()),
                "roles": dict(self.deps), "version": self.version, "family": self.family, "inputs": dict(self.inputs)}


def node_key(kind: StageKind, version: int, inputs: Mapping[str, Any], deps: Mapping[str, str]) -> str:
    return config_hash({"kind": kind.value, "version": version, "inputs": inputs, "deps": deps})


@dataclass
class StageGraph:
    """Nodes in run order (every node after its dependencies), deduplicated by key: two cells that
    need the same stage (the sft cell and the SFT init of minillm) share one node."""

    nodes: dict[str, Node] = field(default_factory=dict)
    # (teacher, student) starting models that must share a vocabulary: checked before anything trains
    same_vocabulary: list[tuple[str, str]] = field(default_factory=list)
    # Pretrained base models (tiny scale: pretrained here or shipped): where every cost is counted from, as a
    # paper-scale checkpoint's own pretraining is not counted
    bases: set[str] = field(default_factory=set)

    def add(self, node: Node) -> str:
        missing = [key for key in node.deps.values() if key not in self.nodes]
        assert not missing, f"{node.label}: dependencies {missing} must be added first"
        self.nodes.setdefault(node.key, node)
        return node.key

    def drop_unneeded(self) -> None:
        """Keep only the nodes some cell is built from: a tiny student's random initialisation, for one, is not
        needed when every method starts from a shipped SFT init."""
        needed = {key for cell in self.cells() for key in self.lineage(cell.key)}
        self.nodes = {key: node for key, node in self.nodes.items() if key in needed}
        self.same_vocabulary = [pair for pair in self.same_vocabulary if set(pair) <= needed]
        self.bases &= needed

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __getitem__(self, key: str) -> Node:
        return self.nodes[key]

    def __len__(self) -> int:
        return len(self.nodes)

    def cells(self) -> list[Node]:
        return [node for node in self if node.kind is StageKind.EVAL]

    def lineage(self, key: str, skip_roles: tuple[str, ...] = (), skip_keys: Set[str] = frozenset()) -> list[str]:
        """``key`` and every stage it was built from, in run order; a parent read in one of ``skip_roles``, or one of
        ``skip_keys``, is left out with what only it needs."""
        wanted = {key}
        pending = [key]
        while pending:
            for role, parent in self.nodes[pending.pop()].deps.items():
                if parent not in wanted and role not in skip_roles and parent not in skip_keys:
                    wanted.add(parent)
                    pending.append(parent)
        return [k for k in self.nodes if k in wanted]

    def costed_lineage(self, key: str) -> list[str]:
        """``key`` and the stages before it that a row's cost counts, in run order: its lineage without the stages read
        for their tokenizer only, and without the base models (and what only they need), which costs start from."""
        return self.lineage(key, skip_roles=("tokenizer",), skip_keys=self.bases)

    def start_of(self, key: str) -> Node:
        """The starting model (an init or checkpoint node) the model of ``key`` was trained from."""
        node = self.nodes[key]
        while node.kind is StageKind.TRAIN:
            node = self.nodes[node.deps["init"]]
        return node
