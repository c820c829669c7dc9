"""What every benchmark writes: ``benchmarks/results/<name>.json`` with the measured ``ratio``, its ``target`` and
``goal`` (``"<="`` or ``">="``), whether it is met, and the details measured beside it; and the tiny teacher the
training benchmarks train."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from kdbench.data import TEMPLATE_PIECES, TokenizedExample, format_prompt, tokenize_records
from kdbench.tinysuite import TinySuiteOptions, generate
from kdbench.zoo import build_tiny_model, load_tokenizer, train_tokenizer
from kdbench_plugins.families import GPT2, TINY_TEACHER

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Where the numbers were measured: they hold for that machine only."""
    return {"machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def on_device(name: str, device: torch.device | str) -> str:
    """A benchmark's result name on ``device``: the CPU figures keep the plain name, a GPU's get its own file."""
    kind = torch.device(device).type
    return name if kind == "cpu" else f"{name}_{kind}"


def write_result(name: str, ratio: float, target: float, goal: str, command: str, **details: Any) -> Path:
    """Write and print the result; ``goal`` says which side of ``target`` the ratio must be on."""
    if goal not in ("<=", ">="):
        raise ValueError(f"goal must be '<=' or '>=', not {goal!r}")
    met = ratio <= target if goal == "<=" else ratio >= target
    record = {"name": name, "ratio": ratio, "target": target, "goal": goal, "met": met, "command": command,
              **details, **machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{name}: ratio {ratio:.3f} (target {goal} {target}): {'met' if met else 'NOT met'}; written to {path}")
    return path


def tiny_teacher(root: Path) -> tuple[Any, list[TokenizedExample]]:
    """The tiny suite's GPT-2 teacher architecture, freshly initialised as ``root/model`` with a tokenizer trained on
    the suite's training split; that tokenizer and the split, tokenised as the suite does."""
    splits = generate(TinySuiteOptions())
    train_tokenizer((format_prompt(r) + r["response"] for r in splits["train"]), 1024, root / "tok", TEMPLATE_PIECES)
    tokenizer = load_tokenizer(str(root / "tok"))
    build_tiny_model(GPT2, TINY_TEACHER, tokenizer, 64, 0, root / "model")
    return tokenizer, tokenize_records(splits["train"], tokenizer, 64, 48)
