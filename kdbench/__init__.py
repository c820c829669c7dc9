"""kdbench: benchmark knowledge-distillation objectives for causal language models under one protocol.

A plugin implements hooks marked ``hookimpl`` (``kdbench.hookspecs``) and registers what it defines against the
three plugin contracts imported from here: ``Objective``, ``SequenceSource`` and ``Metric`` (``kdbench.contracts``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdbench.hookspecs import hookimpl

if TYPE_CHECKING:
    from kdbench.contracts import Metric, Objective, SequenceSource

__version__ = "0.1.0"
__all__ = ["Metric", "Objective", "SequenceSource", "hookimpl", "__version__"]
CONTRACTS = ("Metric", "Objective", "SequenceSource")


def __getattr__(name: str) -> Any:
    # The contracts bring torch (2 s): loaded when a plugin asks for one, not by `import kdbench` alone.
    if name in CONTRACTS:
        from kdbench import contracts

        return getattr(contracts, name)
    raise AttributeError(f"module 'kdbench' has no attribute {name!r}")
