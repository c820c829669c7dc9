"""Wall time of the tiny suite's grids, run from an empty cache, against the time issue 26 allows each.

Three grids: the README's quick start (``sft`` and ``kd``, GPT-2 and OPT, one training seed, as two one-thread
workers by ``kdbench run --workers 2``; at most 3 min), the
all-objectives reference (every registered objective, both families, three seeds; ``results/reference/
tiny-all-methods``; at most 45 min) and the sizes reference (the six seed methods over both students; ``results/
reference/tiny-sizes``; at most 45 min). Each runs as the README writes its command, in fresh processes with a
fresh cache and results folder, and is timed as a whole. ``--workers N`` runs N such processes on the one cache and
results folder, each with its share of the cores (the lock per stage key builds every stage once). Every cell is
then checked against the committed reference it belongs to (the same metrics per evaluation seed), so a faster grid
is never a different one, and the time is broken down by method from the cells' records. ``--keep DIR`` keeps the
results folder (how the references themselves are made); ``--cache DIR`` uses and keeps that stage cache instead of
an empty one, and the time printed then says it was not from an empty cache. Run from the repository root:

    python benchmarks/tiny_grid.py --grid quick-start|all-methods|sizes [--workers 2] [--keep DIR] [--cache DIR]
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
from collections import defaultdict
from pathlib import Path
from typing import Any

from record import write_result

REPOSITORY = Path(__file__).resolve().parents[1]
SEED_METHODS = "sft,kd,seqkd,minillm,dpkd,dpkd-token"
GRIDS = {  # the run's arguments, the reference its cells must equal, the time allowed from an empty cache (s)
    "quick-start": (["--methods", "sft,kd", "--models", "gpt2,opt", "--seeds", "1", "--workers", "2"],
                    "results/reference/tiny-all-methods", 3 * 60),
    "all-methods": (["--models", "gpt2,opt"], "results/reference/tiny-all-methods", 45 * 60),
    "sizes": (["--methods", SEED_METHODS, "--models", "gpt2,opt", "--students", "s1,s2"],
              "results/reference/tiny-sizes", 45 * 60),
}


def cells(folder: Path) -> dict[str, dict[str, Any]]:
    return {str(path.parent.relative_to(folder)): json.loads(path.read_text())
            for path in sorted(folder.glob("cells/**/result.json"))}


def run_grid(arguments: list[str], out: Path, cache: Path, workers: int) -> float:
    """Seconds until every worker of ``kdbench run`` has finished; each worker gets ``cores // workers`` threads."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    environment = {**os.environ, "KDBENCH_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   **({"OMP_NUM_THREADS": threads} if workers > 1 else {})}
    command = [sys.executable, "-m", "kdbench", "run", *arguments, "--out", str(out)]
    started = time.perf_counter()
    processes = [subprocess.Popen(command, cwd=REPOSITORY, env=environment, stdout=subprocess.DEVNULL)
                 for _ in range(workers)]
    codes = [process.wait() for process in processes]
    if any(codes):
        raise SystemExit(f"kdbench run exited with {codes}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="quick-start")
    parser.add_argument("--workers", type=int, default=1, help="kdbench run processes sharing the cores")
    parser.add_argument("--keep", type=Path, default=None, help="copy the results folder here afterwards")
    parser.add_argument("--cache", type=Path, default=None, help="use and keep this stage cache (default: an empty one)")
    args = parser.parse_args()
    arguments, reference, allowed = GRIDS[args.grid]
    empty_cache = args.cache is None or not args.cache.exists() or not any(args.cache.iterdir())

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        seconds = run_grid(arguments, out, args.cache or Path(tmp) / "cache", args.workers)
        got = cells(out)
        if args.keep is not None:
            shutil.copytree(out, args.keep, dirs_exist_ok=True)
    want = cells(REPOSITORY / reference)
    compared = [cell for cell in got if cell in want]
    same = bool(compared) and all(got[c]["metrics"] == want[c]["metrics"] for c in compared)
    # Seconds by method that this run spent on its cells (the stages it built for them, and their evaluation; a
    # shipped model's recorded training is not this run's), and the evaluation's share.
    by_method: dict[str, dict[str, float]] = defaultdict(lambda: {"this_run": 0.0, "eval": 0.0})
    for result in got.values():
        by_method[result["method"]]["this_run"] += float(result["wall_seconds"]["this_run"])
        by_method[result["method"]]["eval"] += float(result["wall_seconds"]["eval"])
    for method, split in sorted(by_method.items()):
        print(f"  {method:<12} {split['this_run']:>6.0f} s this run, of which evaluation {split['eval']:>4.0f} s")
    cache = "an empty" if empty_cache else "a filled"
    print(f"{args.grid}: {len(got)} cells in {seconds:.0f} s from {cache} cache with {args.workers} worker(s) "
          f"(allowed: {allowed // 60} min); {len(compared)} cells in {reference}, every one scored as committed: "
          f"{'yes' if same else 'NO'}")
    write_result(f"tiny_grid_{args.grid.replace('-', '_')}", seconds / allowed, 1.0, "<=",
                 f"python benchmarks/tiny_grid.py --grid {args.grid} --workers {args.workers}",
                 ratio_is="wall time ÷ the time allowed", seconds=seconds, allowed_seconds=allowed, cells=len(got),
                 compared_cells=len(compared), same_as_reference=same, workers=args.workers, empty_cache=empty_cache,
                 grid=" ".join(arguments), seconds_by_method=by_method)


if __name__ == "__main__":
    main()
