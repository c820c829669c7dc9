"""The plugin manager and the one registry type every kind of plugin object goes through."""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pluggy

from kdbench import hookspecs
from kdbench.errors import KdbenchError

ENTRY_POINT_GROUP = "kdbench.plugins"
# Plugins never to import, comma-separated: entry-point names (``kd``), distributions (``kdbench-extra``) or
# plugin files of --plugins-dir (``jeffreys`` or ``jeffreys.py``). A plugin is code that runs with your rights
# as soon as it is loaded; this stops a suspect one without uninstalling it.
BLOCK_ENV = "KDBENCH_BLOCK_PLUGINS"
T = TypeVar("T")


class Registry(Generic[T]):
    """Name → item, remembering which plugin registered each name.

    A duplicate name is an error that names both origins; an unknown name answers with the
    closest matches and the full list.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, tuple[T, str]] = {}

    def add(self, name: str, item: T, origin: str) -> None:
        if name in self._items:
            raise KdbenchError(
                f"{self.kind} {name!r} is registered twice: by {self._items[name][1]} and by {origin}. "
                "Rename one of them or uninstall one of the plugins."
            )
        self._items[name] = (item, origin)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KdbenchError(self.unknown_message(name))
        return self._items[name][0]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._items)) or 'none'}."

    def origin(self, name: str) -> str:
        return self._items[name][1]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def blocked_plugins() -> set[str]:
    """The names ``KDBENCH_BLOCK_PLUGINS`` lists."""
    return {name.strip() for name in os.environ.get(BLOCK_ENV, "").split(",") if name.strip()}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # distribution names compare as pip compares them (PEP 503)


def _block_entry_points(manager: pluggy.PluginManager, blocked: set[str]) -> set[str]:
    """Tell ``manager`` to skip the entry points ``blocked`` names, by their own name or their distribution's,
    before any is imported; returns the names that matched."""
    matched: set[str] = set()
    by_distribution = {_normalized(name): name for name in blocked}
    for dist in importlib.metadata.distributions():
        distribution = by_distribution.get(_normalized(dist.metadata["Name"] or ""))
        for entry in dist.entry_points:
            if entry.group != ENTRY_POINT_GROUP:
                continue
            if entry.name in blocked or distribution is not None:
                manager.set_blocked(entry.name)
                matched.add(entry.name if entry.name in blocked else str(distribution))
    return matched


def _is_blocked_file(path: Path, blocked: set[str]) -> bool:
    return bool({path.stem, path.name, str(path)} & blocked)


def _load_plugins_dir(manager: pluggy.PluginManager, plugins_dir: Path) -> None:
    if not plugins_dir.is_dir():
        raise KdbenchError(f"--plugins-dir {plugins_dir} is not a directory; expected a folder of .py plugin files.")
    blocked = blocked_plugins()
    for path in sorted(plugins_dir.glob("*.py")):
        if _is_blocked_file(path, blocked):  # never executed
            continue
        module_name = f"kdbench_local_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # a broken plugin file is the user's to fix: name it, no traceback
            raise KdbenchError(f"plugin file {path} failed to load: {type(error).__name__}: {error}. "
                               "Fix the file or remove it from --plugins-dir.") from None
        sys.modules[module_name] = module
        manager.register(module, name=str(path))


def build_plugin_manager(plugins_dir: Path | None = None) -> pluggy.PluginManager:
    """Built-ins and third-party packages come through the entry-point group (the built-in objectives
    are registered that way too, proving the path), then ``plugins_dir``. Nothing runs at import."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    blocked = blocked_plugins()
    if blocked:
        matched = _block_entry_points(manager, blocked)
        if plugins_dir is not None and plugins_dir.is_dir():
            matched |= {name for name in blocked for path in plugins_dir.glob("*.py") if _is_blocked_file(path, {name})}
        unknown = sorted(blocked - matched)
        if unknown:  # a misspelt name would silently block nothing
            installed = sorted(entry.name for dist in importlib.metadata.distributions() for entry in dist.entry_points
                               if entry.group == ENTRY_POINT_GROUP)
            raise KdbenchError(f"{BLOCK_ENV} names {unknown}, which match no plugin; expected entry-point names "
                               f"({', '.join(installed)}), distribution names or --plugins-dir file names. Fix the "
                               f"spelling, or remove them from {BLOCK_ENV}.")
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    if plugins_dir is not None:
        _load_plugins_dir(manager, plugins_dir)
    try:
        manager.check_pending()  # a misspelt hook name in any plugin fails loudly here
    except pluggy.PluginValidationError as error:
        raise KdbenchError(f"a plugin implements a hook kdbench does not define: {error}") from None
    return manager


def plugin_origin(manager: pluggy.PluginManager, plugin: object) -> str:
    """Where a plugin came from: its distribution and entry point, or its file."""
    name = manager.get_name(plugin) or repr(plugin)
    for registered, dist in manager.list_plugin_distinfo():
        if registered is plugin:
            return f"{dist.project_name} {dist.version} (entry point {name})"
    return name


@dataclass
class Registries:
    objectives: Registry[Any]
    families: Registry[Any]
    datasets: Registry[Any]
    metrics: Registry[Any]
    sources: Registry[Any]
    manager: pluggy.PluginManager


def _collect(manager: pluggy.PluginManager, hook_name: str, kind: str) -> Registry[Any]:
    registry: Registry[Any] = Registry(kind)
    # Call each implementation on its own so every item keeps the origin of the plugin that gave it.
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        for item in impl.function() or []:
            registry.add(item.name, item, plugin_origin(manager, impl.plugin))
    return registry


def load_registries(plugins_dir: Path | None = None) -> Registries:
    manager = build_plugin_manager(plugins_dir)
    return Registries(
        objectives=_collect(manager, "kdbench_register_objectives", "objective"),
        families=_collect(manager, "kdbench_register_model_families", "model family"),
        datasets=_collect(manager, "kdbench_register_datasets", "dataset"),
        metrics=_collect(manager, "kdbench_register_metrics", "metric"),
        sources=_collect(manager, "kdbench_register_sequence_sources", "sequence source"),
        manager=manager,
    )
