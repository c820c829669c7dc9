"""kdbench: benchmark knowledge-distillation objectives for causal language models under one protocol.

A plugin implements hooks marked ``hookimpl`` (``kdbench.hookspecs``) and registers what it defines against the
three plugin contracts imported from here: ``Objective``, ``SequenceSource`` and ``Metric`` (``kdbench.contracts``).
"""

from kdbench.contracts import Metric, Objective, SequenceSource
from kdbench.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["Metric", "Objective", "SequenceSource", "hookimpl", "__version__"]
