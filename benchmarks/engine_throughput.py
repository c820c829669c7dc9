"""Training throughput of the engine settings the tiny suite could use, measured side by side.

Trains the tiny-suite teacher (GPT-2 family, ~0.94M parameters) for the same number of optimizer
steps under each setting, in one process, and prints tokens/s and the ratio to plain accelerate in
fp32. Writes the numbers as JSON. Run from the repository root:

    python benchmarks/engine_throughput.py --steps 60 --out benchmarks/engine_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from record import tiny_teacher

from kdbench.config import TrainingConfig
from kdbench.train.engine import TrainingData, train
from kdbench.zoo import load_model
from kdbench_plugins.sft import SFT

SETTINGS = {
    "accelerate-fp32": {"engine": "accelerate", "precision": "fp32"},
    "accelerate-bf16": {"engine": "accelerate", "precision": "bf16"},
    "deepspeed-zero1-fp32": {"engine": "deepspeed", "zero_stage": 1, "precision": "fp32"},
    "deepspeed-zero3-fp32": {"engine": "deepspeed", "zero_stage": 3, "precision": "fp32"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/engine_throughput.json"))
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer, examples = tiny_teacher(root)
        measured: dict[str, dict[str, float]] = {}
        for label, overrides in SETTINGS.items():
            config = TrainingConfig(lr=3e-3, batch_size=args.batch_size, max_steps=args.steps, warmup_steps=10, **overrides)
            _, stats = train(load_model(str(root / "model")), SFT, SFT.make_params({}),
                             TrainingData(examples, tokenizer.pad_token_id), config, 0)
            measured[label] = {"tokens_per_second": stats.tokens / stats.seconds, "seconds": stats.seconds,
                               "final_loss": stats.log[-1]["loss"]}
    baseline = measured["accelerate-fp32"]["tokens_per_second"]
    print(f"{'setting':<24}{'tokens/s':>12}{'ratio':>8}{'final loss':>12}")
    for label, row in measured.items():
        row["ratio_to_accelerate_fp32"] = row["tokens_per_second"] / baseline
        print(f"{label:<24}{row['tokens_per_second']:>12.0f}{row['ratio_to_accelerate_fp32']:>8.2f}{row['final_loss']:>12.3f}")
    payload = {"steps": args.steps, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "machine": platform.platform(), "torch": torch.__version__, "results": measured}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
