"""kdbench: benchmark knowledge-distillation objectives for causal language models under one protocol."""

from kdbench.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
