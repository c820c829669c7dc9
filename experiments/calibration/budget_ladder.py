"""The budget ladder: the tiny suite's SFT row at k times its budget, to see where it stops moving.

For each factor k this writes ``experiments/tiny.yaml`` with the SFT init's ``max_steps`` × k (trained here; k = 1
reads the shipped ``models.sft_inits``, which are that init), the method stage's × k and the validations of both k
times further apart, runs ``kdbench run`` of it (``sft`` only, one family, ``--seeds`` training seeds, the shipped
teacher) into ``--out``/k<k> on one cache (``--cache``, by default under ``--out``; name the reference run's cache and
k = 1 reuses its stages), and prints ROUGE-L overall and per task, averaged over the training seeds, with the
teacher's beside it. A row has plateaued when doubling its budget moves it by less than a point. Run from the
repository root (k = 2 with three seeds trains 3 × (4,000 + 400) steps of the 61k student from its shipped base):

    python experiments/calibration/budget_ladder.py --factors 1 2 --seeds 3 --out /tmp/ladder
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean
from typing import Any

import yaml

from kdbench.config import load_experiment

REPOSITORY = Path(__file__).resolve().parents[2]
TINY = REPOSITORY / "experiments" / "tiny.yaml"


def ladder_experiment(factor: int, family: str) -> dict[str, Any]:
    experiment = yaml.safe_load(TINY.read_text())
    experiment["name"] = f"ladder{factor}"
    experiment["init"]["training"]["max_steps"] *= factor
    experiment["init"]["select_every"] = load_experiment(TINY).init_select_every * factor  # its fallback resolved once
    experiment["training"]["max_steps"] *= factor
    experiment["selection"]["every"] *= factor
    experiment["models"]["teachers"] = {family: str(REPOSITORY / "experiments" / "teachers" / family)}
    experiment["models"]["bases"] = {family: str(REPOSITORY / "experiments" / "bases" / family)}
    inits = experiment["models"].pop("sft_inits", {})
    if factor == 1 and family in inits:  # the shipped SFT inits are this init block's training: read, not retrained
        experiment["models"]["sft_inits"] = {family: str(REPOSITORY / "experiments" / inits[family])}
    experiment["methods"] = {"sft": {}}
    return experiment


def rouge(result: dict[str, Any]) -> dict[str, float]:
    """ROUGE-L over the evaluation seeds, overall and per task."""
    by_seed = result["per_task"]
    tasks = sorted(next(iter(by_seed.values())))
    scores = {"all": mean(result["metrics"]["rougeL"].values())}
    scores.update({task: mean(by_seed[seed][task]["rougeL"] for seed in by_seed) for task in tasks})
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--family", default="gpt2")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds 0..N-1, averaged")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, help="stage cache (default: <out>/cache)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "KDBENCH_CACHE_DIR": str(args.cache or args.out / "cache"), "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1"}
    rows: dict[str, dict[str, float]] = {}
    for factor in args.factors:
        experiment = args.out / f"ladder{factor}.yaml"
        experiment.write_text(yaml.safe_dump(ladder_experiment(factor, args.family), sort_keys=False))
        folder = args.out / f"k{factor}"
        subprocess.run([sys.executable, "-m", "kdbench", "run", "-e", str(experiment), "--models", args.family,
                        "--seeds", str(args.seeds), "--out", str(folder)], env=environment, check=True,
                       stdout=subprocess.DEVNULL)
        cells = folder / "cells" / args.family
        by_seed = [rouge(json.loads(path.read_text())) for path in sorted((cells / "s1" / "sft").glob("seed*/result.json"))]
        rows[f"k={factor}"] = {column: mean(scores[column] for scores in by_seed) for column in by_seed[0]}
        print(f"k={factor}: ROUGE-L per training seed", [round(scores["all"], 2) for scores in by_seed], flush=True)
        rows["teacher"] = rouge(json.loads(next((cells / "teacher" / "teacher").glob("seed*/result.json")).read_text()))
    columns = list(next(iter(rows.values())))
    print(f"{'':<10}" + "".join(f"{c:>10}" for c in columns))
    for label, scores in rows.items():
        print(f"{label:<10}" + "".join(f"{scores[c]:>10.1f}" for c in columns))
    (args.out / "ladder.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
