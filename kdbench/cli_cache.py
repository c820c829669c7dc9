"""``kdbench cache``: commands on the stage cache (``kdbench.grid.cache``), registered on the main command by
``kdbench.cli``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from kdbench.errors import KdbenchError

cache_app = typer.Typer(no_args_is_help=True, help="Look after the stage cache that `kdbench run` builds and reuses.")
stdout = Console(emoji=False, highlight=False, soft_wrap=True)  # a path is never cut


@cache_app.command()
def verify(
    cache_dir: Annotated[Optional[Path], typer.Option(
        help="Stage cache (default: $KDBENCH_CACHE_DIR or ~/.cache/kdbench).")] = None,
    repair: Annotated[bool, typer.Option("--repair", help=(
        "Move every corrupt entry aside, to <cache>/.corrupt/<kind>/, so the next run builds it again."))] = False,
) -> None:
    """Check every entry of the cache against the manifest it was published with (each file's size and sha256).

    Prints how many entries are ok, each corrupt one (its folder and what is wrong) and how many have no manifest
    (published before kdbench recorded manifests: used unchecked; delete one to have it rebuilt with a manifest).
    Exit code 1 when an entry is corrupt and left in place; with --repair, 0 once every corrupt entry is moved
    aside. `kdbench run` makes the same check itself, once per entry and run, and moves a corrupt entry aside."""
    from kdbench.grid.cache import StageCache, default_cache_dir, verify_cache

    root = cache_dir or default_cache_dir()
    if not root.is_dir():
        raise KdbenchError(f"the cache folder {root} {'is a file' if root.exists() else 'does not exist'}; expected "
                           "the folder `kdbench run` keeps its stages in. Pass it with --cache-dir, or set "
                           "KDBENCH_CACHE_DIR.")
    checks = verify_cache(StageCache(root), repair)
    corrupt = [check for check in checks if check.verdict.state == "corrupt"]
    unverified = [check for check in checks if check.verdict.state == "unverified"]
    ok = len(checks) - len(corrupt) - len(unverified)
    stdout.print(f"{len(checks)} cache entries in {root}: {ok} ok, {len(corrupt)} corrupt, {len(unverified)} without "
                 "a manifest", markup=False)
    for check in corrupt:
        moved = f"; moved aside to {check.moved_to}" if check.moved_to else ""
        stdout.print(f"corrupt: {check.folder}: {check.verdict.problem}{moved}", markup=False)
    for check in unverified:
        stdout.print(f"without a manifest (used unchecked): {check.folder}", markup=False)
    left = [check for check in corrupt if check.moved_to is None]
    if left and not repair:
        stdout.print(f"run `kdbench cache verify --repair{f' --cache-dir {cache_dir}' if cache_dir else ''}` to move "
                     f"the corrupt {'entry' if len(left) == 1 else 'entries'} aside; the next run builds "
                     f"{'it' if len(left) == 1 else 'them'} again.", markup=False)
    if left:
        raise typer.Exit(1)
