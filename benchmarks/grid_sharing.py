"""Wall time of a grid of teacher-forced objectives that share the teacher's stored outputs, against the same grid
running the teacher in every training stage; and what the stored top-k distributions do to the scores.

The tiny suite's GPT-2 family (the shipped teacher, 934k parameters, distilling the suite's 61k student), eight
teacher-forced methods × three training seeds. The unshared grid is the exact path: every stage runs the teacher on
its own batches. The shared grid adds ``teacher_outputs: {share: true, top_k: K}``: one stage runs the teacher once
over the 3,000 training sequences and keeps its top ``K`` tokens per response position with an even tail, and all
24 stages read them. Both grids start from one cache that already holds what they have in common (tokenised data and
the shipped SFT inits, read by an sft run), built first and copied, so the timed runs differ by the teacher work
alone; each is one ``kdbench run`` process, timed whole (teacher row and evaluation included). Run from the
repository root:

    python benchmarks/grid_sharing.py [--top-k 32] [--seeds 3]

The ratio is the shared grid's wall time ÷ the unshared grid's. Each method's mean ROUGE-L over the training seeds
must lie within the exact path's seed spread: its 95% Student-t interval over the seeds (the interval a
leaderboard row prints).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any

import yaml
from record import write_result

from kdbench.report.statistics import sample_std, t_interval

REPOSITORY = Path(__file__).resolve().parents[1]
METHODS = "kd,rkl,jsd,tvd,skl,srkl,akl,abkd"  # every built-in objective reading teacher logits on gold alone


def experiment_file(folder: Path, top_k: int | None) -> Path:
    """The tiny suite's experiment, its shipped bases, teachers and SFT inits by absolute path (the file is written
    elsewhere), with the outputs shared when ``top_k`` is given (0: shared exactly), else not."""
    raw = yaml.safe_load((REPOSITORY / "experiments/tiny.yaml").read_text())
    for shipped in ("bases", "teachers", "sft_inits"):
        raw["models"][shipped] = {f: str(REPOSITORY / "experiments" / p) for f, p in raw["models"][shipped].items()}
    raw["teacher_outputs"] = {"share": False} if top_k is None else {"share": True, "top_k": top_k or None}
    path = folder / ("tiny.yaml" if top_k is None else "tiny-shared.yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def run(experiment: Path, methods: str, seeds: int, cache: Path, out: Path) -> float:
    command = [sys.executable, "-m", "kdbench", "run", "-e", str(experiment), "--methods", methods, "--models", "gpt2",
               "--seeds", str(seeds), "--out", str(out)]
    environment = {**os.environ, "KDBENCH_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run(command, cwd=REPOSITORY, env=environment, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def seed_scores(out: Path, metric: str = "rougeL") -> dict[str, list[float]]:
    """Per method, each training seed's score (the mean over its evaluation seeds), in seed order."""
    scores: dict[str, dict[int, float]] = {}
    for path in out.glob("cells/gpt2/s1/*/seed*/result.json"):
        result = json.loads(path.read_text())
        assert result["status"] == "ok", f"{path}: {result.get('failure')}"
        scores.setdefault(result["method"], {})[result["train_seed"]] = mean(result["metrics"][metric].values())
    return {method: [by_seed[s] for s in sorted(by_seed)] for method, by_seed in sorted(scores.items())}


def outputs_stage(out: Path) -> dict[str, Any]:
    """What the shared teacher-outputs stage cost, as the cells record it."""
    result = json.loads(next(out.glob("cells/gpt2/s1/kd/seed0/result.json")).read_text())
    return result["cost"]["ancestors"]["gpt2/teacher/outputs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=32, help="tokens kept per position (0: the exact distribution)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default=METHODS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        exact_file, shared_file = experiment_file(root, None), experiment_file(root, args.top_k)
        # What both grids share, built once: data, inits, SFT inits (and the sft cells, which read no teacher).
        warm = run(exact_file, "sft", args.seeds, root / "cache", root / "warm")
        for name in ("exact", "shared"):
            shutil.copytree(root / "cache", root / f"cache-{name}")
        seconds = {"exact": run(exact_file, args.methods, args.seeds, root / "cache-exact", root / "exact"),
                   "shared": run(shared_file, args.methods, args.seeds, root / "cache-shared", root / "shared")}
        exact, shared = seed_scores(root / "exact"), seed_scores(root / "shared")
        stage = outputs_stage(root / "shared")

    print(f"{len(exact)} methods × {args.seeds} seeds, gpt2 (set-up shared by both grids: {warm:.0f} s)")
    print(f"  without sharing {seconds['exact']:7.0f} s")
    print(f"  with sharing    {seconds['shared']:7.0f} s (of which the outputs stage {stage['seconds']:.0f} s, "
          f"top_k {args.top_k or 'exact'})")
    print(f"{'method':<8} {'exact':>18} {'shared':>18} {'difference':>10}  inside the exact interval")
    methods: dict[str, dict[str, Any]] = {}
    for method in exact:
        low, high = t_interval(exact[method]) or (min(exact[method]), max(exact[method]))
        difference = mean(shared[method]) - mean(exact[method])
        inside = low <= mean(shared[method]) <= high
        methods[method] = {"exact": exact[method], "shared": shared[method], "exact_interval": [low, high],
                           "exact_std": sample_std(exact[method]), "shared_std": sample_std(shared[method]),
                           "difference": difference, "inside": inside}
        print(f"{method:<8} {mean(exact[method]):6.2f} ± {sample_std(exact[method]) or 0:4.2f} [{low:5.1f}, {high:5.1f}] "
              f"{mean(shared[method]):6.2f} ± {sample_std(shared[method]) or 0:4.2f} {difference:+10.2f}  "
              f"{'yes' if inside else 'NO'}")
    every = all(m["inside"] for m in methods.values())
    print(f"every method inside its exact interval: {'yes' if every else 'NO'}")
    write_result("grid_sharing", seconds["shared"] / seconds["exact"], 0.6, "<=",
                 f"python benchmarks/grid_sharing.py --top-k {args.top_k} --seeds {args.seeds}",
                 ratio_is="wall time with the teacher's outputs shared ÷ without", seconds=seconds, setup_seconds=warm,
                 top_k=args.top_k or None, methods_list=args.methods.split(","), seeds=args.seeds,
                 outputs_stage=stage, scores=methods, every_method_inside_exact_interval=every)


if __name__ == "__main__":
    main()
