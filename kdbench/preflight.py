"""Checks a run makes before it builds anything, so that a mistake costs seconds, not a training stage.

What a schema cannot see and a run would otherwise meet hours in: a results folder that cannot be written, a
cache folder that cannot be written although the run must build stages in it (a read-only cache that holds every
stage the run needs is only read), a teacher or student path that is not a model folder, a hub checkpoint that is
not available offline, model overrides for families or students the experiment does not have, a
``trust_remote_code`` entry that names no model of the run, and data splits with no record. Every problem is
reported at once, as one ``KdbenchError`` (exit code 2); nothing is written but the results and cache folders
themselves (and a probe file, removed).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kdbench.config import Experiment
from kdbench.errors import KdbenchError
from kdbench.grid.graph import StageGraph, StageKind
from kdbench.registry import Registries

# A hub repository id: "name" or "owner/name" (letters, digits, '-', '_', '.').
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def folder_problem(path: Path, create: bool) -> str | None:
    """Why ``path`` cannot serve as a folder to write in, or None. With ``create`` the folder is made (parents
    too) and a probe file is written and removed in it: that also catches read-only mounts and full disks."""
    path = path.expanduser()
    if path.is_symlink() and not path.exists():  # mkdir would say only "File exists"
        target = os.readlink(path)
        return (f"{path} is a symbolic link to {target}, which does not exist; create that folder "
                f"(mkdir -p {path.parent / target}) or remove the link")
    if path.exists() and not path.is_dir():
        return f"{path} is a file"
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, so no folder can be made under it"
    if not os.access(existing, os.W_OK | os.X_OK):
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            return f"{existing} is on a read-only filesystem"
        return f"{existing} is not writable by this user"
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(dir=path, prefix=".kdbench-write-probe-")
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            return f"{path} cannot be written ({error.strerror or error})"
    return None


def check_writable(path: Path, what: str, fix: str, create: bool = False) -> None:
    """``KdbenchError`` naming ``what`` (``--out``), the problem and ``fix`` when ``path`` cannot be written."""
    problem = folder_problem(path, create)
    if problem is not None:
        raise KdbenchError(f"{what} {path}: {problem}; expected a folder this user can write to (made if missing). "
                           f"{fix}")


def experiment_checkpoints(experiment: Experiment, registries: Registries) -> set[str]:
    """Every checkpoint (hub name or path) the experiment's families start from: what ``trust_remote_code`` may name."""
    models, names = experiment.models, set(experiment.models.teachers.values())
    for family_name in models.families:
        if family_name not in registries.families:
            continue
        family = registries.families.get(family_name)
        if models.scale == "paper":
            names.add(models.teachers.get(family_name, family.paper_teacher))
            overrides = models.student_paths.get(family_name, {})
            names |= {overrides.get(label, name) for label, name in family.paper_students.items()}
    return names


def model_errors(experiment: Experiment, registries: Registries) -> list[str]:
    """Model overrides that would be ignored (an unknown family or student label, student paths at tiny scale) and
    ``trust_remote_code`` entries that name no checkpoint of the experiment: mistakes a run would not notice."""
    models, errors = experiment.models, []
    for field, folders in (("teachers", models.teachers), ("bases", models.bases), ("sft_inits", models.sft_inits)):
        errors += [f"models.{field}.{family}: not one of models.families {models.families}; add the family there or "
                   "remove the entry" for family in folders if family not in models.families]
    if models.sft_inits and experiment.protocol == "uniform" and experiment.init.start == "base":
        errors.append("models.sft_inits: given, but init.start is base, so no method starts from an SFT init; set "
                      "init.start: sft or remove models.sft_inits")
    for family, labels in models.student_paths.items():
        if models.scale != "paper":
            errors.append(f"models.student_paths.{family}: student paths apply at scale paper (tiny students are built "
                          "by kdbench); remove them or set models.scale: paper")
            continue
        if family not in models.families or family not in registries.families:
            errors.append(f"models.student_paths.{family}: not one of models.families {models.families}; add the "
                          "family there or remove the entry")
            continue
        available = sorted(registries.families.get(family).paper_students)
        errors += [f"models.student_paths.{family}.{label}: not a student of {family}; expected one of {available}"
                   for label in labels if label not in available]
    if models.trust_remote_code:
        known = experiment_checkpoints(experiment, registries)
        errors += [f"models.trust_remote_code: {name!r} is not a checkpoint of this experiment; expected some of "
                   f"{sorted(known)}" for name in models.trust_remote_code if name not in known]
    return errors


def _in_hf_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


def checkpoint_errors(graph: StageGraph, loads: bool) -> list[str]:
    """Teacher and student checkpoints of the graph that cannot be loaded: a path that does not exist, a file, a
    folder without ``config.json``; with ``loads`` (a run, not a dry run) and the hub offline, a hub name that is
    not in the local HF cache either."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    errors = []
    for node in graph:
        if node.kind is not StageKind.CHECKPOINT:
            continue
        label, path = node.label, Path(node.spec.path).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                errors.append(f"{label}: {path} holds no config.json; expected a Hugging Face model folder "
                              "(config.json, weights, tokenizer), such as one written by save_pretrained")
        elif path.exists():
            errors.append(f"{label}: {path} is a file; expected a model folder or a hub name")
        elif not HUB_NAME.match(node.spec.path):
            errors.append(f"{label}: {path} does not exist; expected a model folder or a hub name "
                          "(paths in an experiment file are relative to the file)")
        elif loads and offline and not _in_hf_cache(node.spec.path):
            errors.append(f"{label}: {node.spec.path!r} is neither a local folder nor a hub checkpoint in the HF cache, "
                          "and HF_HUB_OFFLINE is set; download it first (HF_HUB_OFFLINE=0 huggingface-cli download "
                          f"{node.spec.path}) or give a local folder")
    return errors


def data_errors(experiment: Experiment, registries: Registries) -> list[str]:
    """Splits a run reads that hold no record: the training, validation and evaluation splits of ``data`` and the
    split of every extra evaluation set. Loading them here also surfaces a missing data file before any stage."""
    wanted: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
        ("data", experiment.data.dataset, experiment.data.options,
         tuple(dict.fromkeys(("train", "validation", experiment.evaluation.split))))]
    wanted += [(f"evaluation.datasets.{label}", extra.dataset, extra.options, (extra.split,))
               for label, extra in experiment.evaluation.datasets.items()]
    errors = []
    for where, name, options, splits in wanted:
        try:
            loaded = registries.datasets.get(name).load(dict(options))
        except KdbenchError:
            raise
        except Exception as error:  # noqa: BLE001  (a loader failing on the user's options: name it, no traceback)
            errors.append(f"{where}: dataset {name!r} with options {options} failed to load: "
                          f"{type(error).__name__}: {error}")
            continue
        for split in splits:
            if not loaded.get(split):
                errors.append(f"{where}: the {split} split of dataset {name!r} (options {options}) holds no record; "
                              "expected at least one. Check its files or options")
    return errors


def check_before_run(experiment: Experiment, registries: Registries, graph: StageGraph, out_dir: Path | None,
                     cache_dir: Path | None, dry_run: bool) -> None:
    """Every check above, reported together. A dry run loads nothing and creates nothing: it checks that the
    folders could be made and that local checkpoints exist."""
    errors = model_errors(experiment, registries) + checkpoint_errors(graph, loads=not dry_run)
    if out_dir is not None:
        problem = folder_problem(out_dir, create=not dry_run)
        if problem is not None:
            errors.append(f"--out {out_dir}: {problem}; expected a folder this user can write to (made if missing). "
                          "Pass another --out.")
    if cache_dir is not None:
        from kdbench.grid.execute import unbuilt_stages  # the executor's imports (torch) only where a run goes on

        problem = folder_problem(cache_dir, create=not dry_run)
        # A cache shared read-only (a team's, a published one) serves a run that builds nothing in it: reading a
        # published entry takes no lock.
        unbuilt = [] if problem is None else unbuilt_stages(graph, out_dir or Path("results") / experiment.name,
                                                            cache_dir)
        if unbuilt:
            named = ", ".join(f"{node.label} ({node.kind.value})" for node in unbuilt[:3])
            errors.append(f"the cache folder {cache_dir}: {problem}, and {len(unbuilt)} stage(s) this run needs are "
                          f"not built there ({named}{', ...' if len(unbuilt) > 3 else ''}); expected a folder this user "
                          "can write to (made if missing), or a cache that already holds every stage the run needs "
                          "(then it is only read). Pass another --cache-dir or set KDBENCH_CACHE_DIR.")
    if not errors and not dry_run:  # data is loaded only when everything else is right
        errors += data_errors(experiment, registries)
    if errors:
        raise KdbenchError(f"{len(errors)} problem(s) found before anything ran:\n" + "\n".join(f"  {e}" for e in errors))


def space_warnings(out_dir: Path, out_bytes: int | None, cache_dir: Path, cache_bytes: int | None) -> list[str]:
    """A line for each filesystem whose free space is below what the run is estimated to write there (the dry run's
    estimate; the results folder and the cache counted together when they share one)."""
    need: dict[int, tuple[list[str], int, int]] = {}  # device → (folders, bytes needed, bytes free)
    for folder, nbytes in ((out_dir, out_bytes), (cache_dir, cache_bytes)):
        if not nbytes:
            continue
        existing = next((p for p in (folder, *folder.absolute().parents) if p.exists()), None)
        if existing is None:
            continue
        device = os.stat(existing).st_dev
        folders, needed, _ = need.get(device, ([], 0, 0))
        need[device] = ([*folders, str(folder)], needed + nbytes, shutil.disk_usage(existing).free)
    return [f"{' and '.join(folders)}: the run may write up to {_size(needed)} there (the dry run's bound, "
            f"sequences counted at data.max_length), and its filesystem has {_size(free)} free. Cells that find "
            "it full are marked failed and the run goes on; free some space, or pass another --out or --cache-dir, before running"
            for folders, needed, free in need.values() if needed > free]


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"
