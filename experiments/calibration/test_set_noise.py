"""Issue 9's test-set check: how much a training seed's score depends on which test prompts were drawn.

Nothing is run again: from the per-example ROUGE-L each cell of a results folder recorded in examples.json (averaged
over evaluation seeds), every student row is scored on k disjoint, equal parts of its test examples, in the split's
order. For each row it prints every training seed's score on each part and on all of them, and the 95% half-width
over training seeds that each part alone would have given. Parts differ in difficulty, which moves every seed alike;
what matters is a seed's lead over the other seeds, part by part. When that lead moves between parts by as much as
the seeds differ, a test set of one part's size mixes which prompts were drawn into the interval over training seeds.
Run from the repository root:

    python experiments/calibration/test_set_noise.py results/reference/tiny-all-methods --parts 4
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from kdbench.report.folder import cell_id, load_folder
from kdbench.report.leaderboard import example_vector
from kdbench.report.statistics import t_interval


def half_width(values: list[float]) -> float:
    interval = t_interval(values)
    return float("nan") if interval is None else (interval[1] - interval[0]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--parts", type=int, default=4, help="disjoint equal parts of the test examples")
    parser.add_argument("--metric", default="rougeL")
    args = parser.parse_args()

    folder = load_folder(args.folder)
    rows: dict[tuple[str, str, str], dict[int, np.ndarray]] = {}
    for result in folder.results:
        if result["kind"] == "teacher" or result["status"] != "ok":
            continue
        family, student, method, seed = cell_id(result)
        vector = example_vector([folder.examples[cell_id(result)]], args.metric)  # one cell: its evaluation seeds' mean
        if vector is None:
            raise SystemExit(f"{family}/{student}/{method}/seed{seed} has no per-example {args.metric} in examples.json")
        rows.setdefault((family, student, method), {})[int(seed)] = vector.values
    moves: list[float] = []
    for (family, student, method), by_seed in sorted(rows.items()):
        count = len(next(iter(by_seed.values())))
        edges = np.linspace(0, count, args.parts + 1).astype(int)
        per_part = {seed: [float(v[a:b].mean()) for a, b in zip(edges, edges[1:])] for seed, v in sorted(by_seed.items())}
        whole = {seed: float(v.mean()) for seed, v in sorted(by_seed.items())}
        print(f"{family}/{student}/{method} ({count} test examples, {args.parts} parts of {count // args.parts})")
        part_means = np.mean(list(per_part.values()), axis=0)
        whole_mean = statistics.fmean(whole.values())
        for seed, parts in per_part.items():
            moves += [abs((part - mean) - (whole[seed] - whole_mean)) for part, mean in zip(parts, part_means)]
            print(f"  seed {seed}: parts {', '.join(f'{p:.2f}' for p in parts)}; all {whole[seed]:.2f}")
        widths = [half_width([parts[i] for parts in per_part.values()]) for i in range(args.parts)]
        print(f"  half-width over training seeds: each part {', '.join(f'{w:.2f}' for w in widths)}; "
              f"all {half_width(list(whole.values())):.2f}")
    print(f"a seed's lead over the seeds' mean, on one part against all: mean move {statistics.fmean(moves):.2f}, "
          f"largest {max(moves):.2f}")


if __name__ == "__main__":
    main()
