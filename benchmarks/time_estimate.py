"""The dry run's time estimates (``kdbench.grid.timing``) against the times a results folder recorded.

For every cell of the folder: its own training stage (``wall_seconds.train``, validation included) and its
evaluation (``wall_seconds.eval``), each beside the estimate the dry run gives that very stage (matched by key) on
this machine's device. Prints the ratio estimate ÷ recorded per stage kind and method (median, min, max) and writes
JSON. A recorded time is a property of the machine and its load when it ran: compare folders made alike. Run from
the repository root:

    python benchmarks/time_estimate.py results/reference/tiny-all-methods [--experiment experiments/tiny.yaml]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from record import write_result

from kdbench.cli_options import with_students
from kdbench.config import load_experiment
from kdbench.grid.cache import default_cache_dir
from kdbench.grid.selection import resolve_selection
from kdbench.grid.session import GridRequest, plan_prepared, prepare
from kdbench.registry import load_registries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a results folder written by kdbench run")
    parser.add_argument("--experiment", type=Path, default=None, help="its experiment file (default: the embedded one)")
    args = parser.parse_args()
    results = [json.loads(path.read_text()) for path in sorted(args.folder.glob("cells/**/result.json"))]
    results = [r for r in results if r["status"] == "ok" and r["kind"] == "student"]
    if not results:
        raise SystemExit(f"{args.folder} holds no scored student cell")
    experiment = with_students(load_experiment(args.experiment), ",".join(sorted({r["student"] for r in results})))
    registries = load_registries()
    selection = resolve_selection(experiment, registries, sorted({r["method"] for r in results}),
                                  sorted({r["family"] for r in results}), 1 + max(r["train_seed"] for r in results))
    prepared = prepare(GridRequest(experiment, selection, None, Path("/nonexistent"), default_cache_dir() / "none"),
                       registries)
    plan = plan_prepared(prepared, 1, False)  # nothing finished or cached: every stage is estimated
    estimates = {stage.node.key: stage.seconds for stage in plan.stages}
    ratios: dict[str, list[float]] = defaultdict(list)
    unmatched = 0
    for result in results:
        if result["key"] not in estimates:
            unmatched += 1
            continue
        train_key = plan.graph[result["key"]].deps["model"]
        pairs = {"eval": (estimates[result["key"]], result["wall_seconds"]["eval"]),
                 "train": (estimates.get(train_key), result["wall_seconds"]["train"])}
        for kind, (estimate, recorded) in pairs.items():
            if estimate is not None and recorded > 0:
                ratios[f"{kind} {result['method']}"].append(estimate / recorded)
                ratios[kind].append(estimate / recorded)
    summary = {name: {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
               for name, values in sorted(ratios.items())}
    print(f"estimate ÷ recorded on {plan.device.kind}, {len(results)} cells of {args.folder} ({unmatched} not in the "
          "grid collected now: their keys changed since)")
    for name, row in summary.items():
        print(f"  {name:<22} median {row['median']:6.2f}  min {row['min']:6.2f}  max {row['max']:6.2f}  (n={row['n']})")
    every = ratios["train"] + ratios["eval"]
    within = sum(1 for r in every if 1 / 3 <= r <= 3) / len(every)
    write_result("time_estimate", within, 0.8, ">=",
                 f"python benchmarks/time_estimate.py {args.folder}"
                 + (f" --experiment {args.experiment}" if args.experiment else ""),
                 ratio_is="share of stages whose estimate is within a factor of 3 of the recorded time",
                 device=plan.device.kind, by_stage=summary, cells=len(results), unmatched=unmatched)


if __name__ == "__main__":
    main()
