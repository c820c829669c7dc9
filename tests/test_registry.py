"""Plugin discovery: entry points, --plugins-dir files, name clashes, misspelt hooks, and `kdbench plugins`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.errors import KdbenchError
from kdbench.objectives import Objective
from kdbench.registry import ENTRY_POINT_GROUP, Registries, Registry, load_registries

MYKD_PLUGIN = textwrap.dedent('''
    """A third-party objective: kd at a fixed temperature of 2."""
    from kdbench import hookimpl
    from kdbench.objectives import Objective
    from kdbench.objectives import soft_cross_entropy


    class MyKD(Objective):
        name = "mykd"
        summary = "kd at temperature two, from a plugins folder"
        paper = "none"

        @staticmethod
        def token_loss(inputs, params):
            return soft_cross_entropy(inputs.student_logits, inputs.teacher_logits, 2.0)


    @hookimpl
    def kdbench_register_objectives():
        return [MyKD]
''')

DUPLICATE_KD_PLUGIN = textwrap.dedent('''
    from kdbench import hookimpl
    from kdbench.objectives import Objective


    class AnotherKD(Objective):
        name = "kd"
        summary = "clashes with the built-in"
        paper = "none"


    @hookimpl
    def kdbench_register_objectives():
        return [AnotherKD]
''')

MISSPELT_HOOK_PLUGIN = textwrap.dedent('''
    from kdbench import hookimpl


    @hookimpl
    def kdbench_register_objectivez():
        return []
''')


def _plugins_dir(root: Path, files: dict[str, str]) -> Path:
    """A fresh folder under ``root`` holding the given plugin files."""
    folder = root / "plugins"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def builtins() -> Registries:
    """Registries from the entry-point group only."""
    return load_registries()


def test_builtins_come_through_entry_points(builtins: Registries) -> None:
    """sft/kd, gpt2/opt, tiny/jsonl, rougeL/exact_match are registered, each from an entry point."""
    expected = {
        "objectives": {"sft", "kd"},
        "families": {"gpt2", "opt"},
        "datasets": {"tiny", "jsonl"},
        "metrics": {"rougeL", "exact_match"},
    }
    for attribute, names in expected.items():
        registry: Registry[object] = getattr(builtins, attribute)
        assert names <= set(registry.names()), attribute
        for name in names:
            assert "entry point" in registry.origin(name), (attribute, name, registry.origin(name))


def test_builtin_modules_are_entry_points_of_the_group() -> None:
    """The built-in plugin modules are declared in the kdbench.plugins group of the installed distribution."""
    from importlib.metadata import entry_points

    values = {ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert {"kdbench_plugins.sft", "kdbench_plugins.kd", "kdbench_plugins.families", "kdbench_plugins.datasets",
            "kdbench_plugins.metrics"} <= values


def test_registered_items_are_what_they_claim(builtins: Registries) -> None:
    """Objectives are Objective subclasses whose name is their registry key; other items carry their key as name."""
    for name in builtins.objectives:
        objective = builtins.objectives.get(name)
        assert issubclass(objective, Objective) and objective.name == name
    for registry in (builtins.families, builtins.datasets, builtins.metrics):
        for name in registry:
            assert registry.get(name).name == name


def test_registry_duplicate_names_both_origins() -> None:
    """Adding a name twice fails with both origins in the message; the first entry stays."""
    registry: Registry[int] = Registry("objective")
    registry.add("kd", 1, "package-a (entry point kd)")
    with pytest.raises(KdbenchError) as info:
        registry.add("kd", 2, "/tmp/plugins/other.py")
    message = str(info.value)
    assert "package-a (entry point kd)" in message and "/tmp/plugins/other.py" in message
    assert registry.get("kd") == 1 and len(registry) == 1


def test_registry_unknown_name_suggests_and_lists() -> None:
    """An unknown name gets 'Did you mean' the closest and the full list of names."""
    registry: Registry[int] = Registry("objective")
    for index, name in enumerate(["sft", "kd", "minillm"]):
        registry.add(name, index, "test")
    with pytest.raises(KdbenchError) as info:
        registry.get("kdd")
    message = str(info.value)
    assert "Did you mean 'kd'" in message
    assert "Available: kd, minillm, sft." in message
    assert "Did you mean" not in registry.unknown_message("zzzzzz")
    assert list(registry) == ["kd", "minillm", "sft"] and "kd" in registry and "kdd" not in registry


def test_empty_registry_message() -> None:
    """With nothing registered the message says so."""
    assert "Available: none." in Registry("metric").unknown_message("rougeL")


def test_plugins_dir_adds_an_objective_with_file_origin(tmp_path: Path, builtins: Registries) -> None:
    """A .py file in --plugins-dir registers mykd next to the built-ins, with its path as origin."""
    folder = _plugins_dir(tmp_path, {"mykd.py": MYKD_PLUGIN, "notes.txt": "not a plugin"})
    registries = load_registries(folder)
    assert "mykd" in registries.objectives
    mykd = registries.objectives.get("mykd")
    assert issubclass(mykd, Objective) and mykd.name == "mykd"
    assert registries.objectives.origin("mykd") == str(folder / "mykd.py")
    assert set(builtins.objectives.names()) | {"mykd"} == set(registries.objectives.names())
    assert "mykd" not in builtins.objectives
    # The new objective's default params work like any other.
    assert mykd.make_params({"kd_ratio": 0.25}).kd_ratio == 0.25


def test_plugins_dir_duplicate_kd_names_both_origins(tmp_path: Path) -> None:
    """A plugin file registering a second 'kd' is an error naming the entry point and the file."""
    folder = _plugins_dir(tmp_path, {"dupkd.py": DUPLICATE_KD_PLUGIN})
    with pytest.raises(KdbenchError) as info:
        load_registries(folder)
    message = str(info.value)
    assert "'kd'" in message
    assert "entry point kd" in message
    assert str(folder / "dupkd.py") in message


def test_plugins_dir_misspelt_hook_is_rejected(tmp_path: Path) -> None:
    """A hook name kdbench does not define fails loudly (pluggy check_pending), naming the hook."""
    folder = _plugins_dir(tmp_path, {"typo.py": MISSPELT_HOOK_PLUGIN})
    with pytest.raises(KdbenchError, match="kdbench_register_objectivez"):
        load_registries(folder)


def test_plugins_dir_must_exist(tmp_path: Path) -> None:
    """A missing folder (or a file given as folder) is a KdbenchError."""
    with pytest.raises(KdbenchError, match="not a directory"):
        load_registries(tmp_path / "nowhere")
    file_path = tmp_path / "file.py"
    file_path.write_text("", encoding="utf-8")
    with pytest.raises(KdbenchError, match="not a directory"):
        load_registries(file_path)


def test_cli_plugins_lists_plugins_dir_objective(tmp_path: Path) -> None:
    """`kdbench plugins --plugins-dir DIR` lists mykd along with the built-ins."""
    folder = _plugins_dir(tmp_path, {"mykd.py": MYKD_PLUGIN})
    result = CliRunner().invoke(app, ["plugins", "--plugins-dir", str(folder)])
    assert result.exit_code == 0, result.output
    assert "mykd" in result.output
    for name in ("sft", "kd", "gpt2", "opt", "tiny", "jsonl", "rougeL", "exact_match"):
        assert name in result.output
    plain = CliRunner().invoke(app, ["plugins"])
    assert plain.exit_code == 0 and "mykd" not in plain.output


def test_the_readme_plugin_example_registers_and_computes_reverse_kl(tmp_path: Path) -> None:
    """The objective the README shows is a working plugin: it loads from --plugins-dir, its sources exist,
    and its loss is the reverse KL (0 where the student equals the teacher, KL(q‖p) by torch elsewhere)."""
    import re

    import torch
    import torch.nn.functional as F

    from kdbench.grid.selection import source_errors
    from kdbench.objectives import GOLD, SequenceView

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Writing a plugin"):]
    (tmp_path / "my_rkl.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    registries = load_registries(tmp_path)
    objective = registries.objectives.get("my-rkl")
    assert source_errors(objective, registries) == []
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    mask, labels = torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.long)
    params = objective.make_params({})
    got = objective.loss({GOLD: SequenceView(student, labels, mask, teacher)}, params)
    want = F.kl_div(teacher.log_softmax(-1), student.log_softmax(-1), reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(got, want)
    same = objective.loss({GOLD: SequenceView(teacher, labels, mask, teacher)}, params)
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-6, rtol=0)
