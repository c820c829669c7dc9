"""Wall time of a committed reference grid, run from an empty cache, against the time the README states for it.

Runs the exact command beside ``results/reference/tiny`` (``sft`` and ``kd``, GPT-2 and OPT, three training seeds;
``--all-methods``: ``results/reference/tiny-all-methods``, the six seed methods) in a fresh process, with a fresh
cache and results folder, and times it as a whole. It then checks that every cell scored exactly what the committed
reference holds (the same metrics per evaluation seed), so a faster grid is never a different one, and breaks the
time down by stage kind from the cells' cost records. Run from the repository root:

    python benchmarks/tiny_grid.py [--all-methods]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from record import write_result

REPOSITORY = Path(__file__).resolve().parents[1]
GRIDS = {  # reference folder, methods, the wall time the README states for it from an empty cache (seconds)
    "tiny": ("results/reference/tiny", "sft,kd", 6 * 60),
    "tiny-all-methods": ("results/reference/tiny-all-methods", "sft,kd,seqkd,minillm,dpkd,dpkd-token", 19 * 60),
}


def cells(folder: Path) -> dict[str, dict[str, Any]]:
    return {str(path.parent.relative_to(folder)): json.loads(path.read_text())
            for path in sorted(folder.glob("cells/**/result.json"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-methods", action="store_true", help="the six-method reference grid")
    args = parser.parse_args()
    name = "tiny-all-methods" if args.all_methods else "tiny"
    reference, methods, stated = GRIDS[name]

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "kdbench", "run", "--methods", methods, "--models", "gpt2,opt", "--out", str(out)]
        environment = {**os.environ, "KDBENCH_CACHE_DIR": str(Path(tmp) / "cache"), "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_OFFLINE": "1"}
        started = time.perf_counter()
        subprocess.run(command, cwd=REPOSITORY, env=environment, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        got, want = cells(out), cells(REPOSITORY / reference)
    same = sorted(got) == sorted(want) and all(got[c]["metrics"] == want[c]["metrics"] for c in want)
    # Seconds by method that this run spent on its cells (the stages it built for them, and their evaluation; a shipped
    # teacher's recorded training is not this run's), and the evaluation's share.
    by_method: dict[str, dict[str, float]] = defaultdict(lambda: {"this_run": 0.0, "eval": 0.0})
    for result in got.values():
        by_method[result["method"]]["this_run"] += float(result["wall_seconds"]["this_run"])
        by_method[result["method"]]["eval"] += float(result["wall_seconds"]["eval"])
    for method, split in by_method.items():
        print(f"  {method:<12} {split['this_run']:>6.0f} s this run, of which evaluation {split['eval']:>4.0f} s")
    print(f"{name}: {len(got)} cells in {seconds:.0f} s from an empty cache (README: about {stated // 60} min); "
          f"every cell scored as the committed reference: {'yes' if same else 'NO'}")
    write_result(f"tiny_grid{'_all_methods' if args.all_methods else ''}", seconds / stated, 1.0, "<=",
                 f"python benchmarks/tiny_grid.py{' --all-methods' if args.all_methods else ''}",
                 ratio_is="wall time ÷ the README's stated time", seconds=seconds, stated_seconds=stated,
                 cells=len(got), same_as_reference=same, grid=" ".join(command[3:-2]), seconds_by_method=by_method)


if __name__ == "__main__":
    main()
