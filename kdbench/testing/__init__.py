"""The plugin-author kit: test an objective against the host with one line.

Registered as a pytest plugin (the ``pytest11`` entry point), so wherever kdbench is installed a test suite
has its fixtures — ``kdbench_kit`` (a tiny teacher, student, tokenizer and data, real Hugging Face folders
built with kdbench's zoo), ``kdbench_teacher``, ``kdbench_student``, ``kdbench_tokenizer`` and
``kdbench_logits`` (hand-built logits) — and can check an objective against the contract every built-in
objective passes::

    from kdbench.testing import objective_contract

    def test_my_objective_keeps_the_contract(kdbench_kit):
        objective_contract(MyObjective, kdbench_kit)

Being a pytest plugin, this module is imported when any test session starts, before a ``conftest.py`` can set
the environment that transformers reads once, when it is imported (``HF_HUB_OFFLINE``): so it imports only
pytest, and the kit's classes and functions are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kdbench.testing.fixtures import kdbench_kit, kdbench_logits, kdbench_student, kdbench_teacher, kdbench_tokenizer

if TYPE_CHECKING:
    from kdbench.testing.contract import objective_contract
    from kdbench.testing.kit import TinyKit, default_kit, hand_built_view

_DEFINED_IN = {"objective_contract": "kdbench.testing.contract", "TinyKit": "kdbench.testing.kit",
               "default_kit": "kdbench.testing.kit", "hand_built_view": "kdbench.testing.kit"}

__all__ = ["TinyKit", "default_kit", "hand_built_view", "kdbench_kit", "kdbench_logits", "kdbench_student",
           "kdbench_teacher", "kdbench_tokenizer", "objective_contract"]


def __getattr__(name: str) -> Any:
    if name not in _DEFINED_IN:
        raise AttributeError(f"module 'kdbench.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(_DEFINED_IN[name]), name)
