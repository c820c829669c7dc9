"""Issue 9's capacity ladder: tiny SFT students of several sizes trained far past the suite's budget, to find one whose
plateau lies well below the teacher's (a suite where capacity, not training time, decides).

For each architecture (``WIDTHxLAYERSxHEADS``) and each budget (optimizer steps from a fresh initialisation), a student
of the family is initialised with the training seed, trained with SFT under the suite's SFT-init settings (lr, batch,
warm-up), keeping its best validation-loss checkpoint (scored 12 times), and evaluated as the suite evaluates (the test
split, sampled, evaluation seeds 10, 20, 30): ROUGE-L overall and per task, beside the shipped teacher's. A student
has plateaued when doubling its budget moves it by less than a point. Run from the repository root:

    python experiments/calibration/student_capacity.py --archs 16x2x2 32x2x2 --steps 6400 12800 --out /tmp/capacity
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from budget_ladder import rouge

from kdbench.config import load_experiment
from kdbench.data import tokenize_records
from kdbench.eval.evaluation import evaluate
from kdbench.grid.stages import PRECISION_DTYPES
from kdbench.registry import load_registries
from kdbench.train.engine import TrainingData, Validation, train, validation_loss
from kdbench.zoo import TinyArch, build_tiny_model, count_parameters, load_model, load_tokenizer

REPOSITORY = Path(__file__).resolve().parents[2]
SCORINGS = 12  # validation-loss evaluations per run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["16x2x2", "32x2x2"],
                        help="WIDTHxLAYERSxHEADS[xFFN] each (FFN defaults to 4 x WIDTH)")
    parser.add_argument("--steps", type=int, nargs="+", default=[6400, 12800])
    parser.add_argument("--family", default="gpt2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    experiment = load_experiment(None)
    registries = load_registries()
    family = registries.families.get(args.family)
    teacher_folder = REPOSITORY / "experiments" / "teachers" / args.family
    tokenizer = load_tokenizer(str(teacher_folder))
    data = experiment.data
    splits = registries.datasets.get(data.dataset).load(dict(data.options))
    train_examples = tokenize_records(splits["train"], tokenizer, data.max_length, data.max_prompt_length)
    validation = tokenize_records(splits["validation"], tokenizer, data.max_length, data.max_prompt_length)
    evaluation = experiment.evaluation
    metric = registries.metrics.get("rougeL")
    seeds = [str(s) for s in evaluation.seeds]
    test = splits[evaluation.split]

    def scored(model: Any) -> dict[str, float]:
        model.eval()
        return rouge(evaluate(model, tokenizer, test, [metric], seeds, evaluation.max_new_tokens, evaluation.batch_size))

    rows: dict[str, dict[str, Any]] = {"teacher": scored(load_model(str(teacher_folder), PRECISION_DTYPES["fp32"]))}
    sft = registries.objectives.get("sft")
    for arch_text in args.archs:
        arch = TinyArch(*(int(part) for part in arch_text.split("x")))  # WIDTHxLAYERSxHEADS[xFFN]
        init = args.out / f"init-{arch_text}-seed{args.seed}"
        build_tiny_model(family, arch, tokenizer, data.max_length, args.seed, init)
        for steps in args.steps:
            settings = experiment.init_training.model_copy(update={"max_steps": steps})
            select = Validation(lambda model: validation_loss(model, validation, tokenizer.pad_token_id, 500),
                                max(1, steps // SCORINGS), higher_is_better=False)
            started = time.perf_counter()
            model, stats = train(lambda: load_model(str(init)), sft, sft.make_params({}),
                                 TrainingData(train_examples, tokenizer.pad_token_id, tokenizer.eos_token_id), settings,
                                 args.seed, validation=select)
            label = f"{arch_text} {steps}"
            rows[label] = {**scored(model), "params": count_parameters(model), "selected_step": stats.selected_step,
                           "minutes": (time.perf_counter() - started) / 60}
            print(label, json.dumps(rows[label]), flush=True)
            (args.out / "capacity.json").write_text(json.dumps(rows, indent=2) + "\n")
    columns = [c for c in rows["teacher"]]
    print(f"{'':<14}" + "".join(f"{c:>10}" for c in columns))
    for label, row in rows.items():
        print(f"{label:<14}" + "".join(f"{row[c]:>10.1f}" for c in columns))


if __name__ == "__main__":
    main()
