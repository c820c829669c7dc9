"""What a run may execute that it did not ship: the code of checkpoints an experiment trusts by name.

``trust_remote_code`` is off for every model, tokenizer and config kdbench loads (``kdbench.zoo``), unless the
experiment lists the checkpoint in ``models.trust_remote_code``. A model kdbench trains from such a checkpoint
is saved with that code beside it, so its folders in the stage cache are trusted too, and nothing else is.
(Plugins are the other code a run executes: ``KDBENCH_BLOCK_PLUGINS`` stops named ones, ``kdbench.registry``.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdbench.config import Experiment
from kdbench.grid.cache import StageCache
from kdbench.grid.graph import StageGraph, StageKind
from kdbench.zoo import remote_code_trusted


def trusted_models(experiment: Experiment, graph: StageGraph, cache_dir: Path) -> set[str]:
    """The checkpoints the experiment trusts, and the cache folders of every model trained from one of them."""
    names = set(experiment.models.trust_remote_code)
    if not names:
        return set()
    trusted, cache = set(names), StageCache(cache_dir)
    for node in graph:
        start = graph.start_of(node.key) if node.kind is StageKind.TRAIN else None
        if start is not None and start.kind is StageKind.CHECKPOINT and start.spec.path in names:
            trusted.add(str(cache.entry(node.kind.value, node.key).absolute()))
    return trusted


@contextmanager
def remote_code_scope(experiment: Experiment, graph: StageGraph, cache_dir: Path) -> Iterator[None]:
    """Inside, exactly the models ``trusted_models`` names may run their own code when loaded."""
    with remote_code_trusted(trusted_models(experiment, graph, cache_dir)):
        yield
