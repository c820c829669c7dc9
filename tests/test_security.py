"""What a run executes or writes beyond its own code: checkpoints' remote code (off unless named), weights
(safetensors only), pickles (never loaded without ``weights_only``), plugins (blockable by name), shells (none)."""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.config import load_experiment
from kdbench.errors import KdbenchError
from kdbench.registry import BLOCK_ENV, load_registries
from kdbench.zoo import build_tiny_model, load_model, load_tokenizer, remote_code_trusted, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "kdbench").rglob("*.py"), *(REPO / "plugins").glob("*.py")])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 model folder with its tokenizer, as kdbench writes one."""
    root = tmp_path_factory.mktemp("security")
    tokenizer = train_tokenizer([f"sample text number {i}" for i in range(40)], 280, root / "tokenizer")
    family = load_registries().families.get("gpt2")
    build_tiny_model(family, family.tiny_students["s1"], tokenizer, 32, 0, root / "model")
    return root / "model"


# -- trust_remote_code ----------------------------------------------------------------------------------

def test_every_load_passes_trust_remote_code_and_it_is_off_unless_named(tiny_folder: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Model, tokenizer and config loading all pass ``trust_remote_code`` explicitly: False by default, True only
    for the names opened with ``remote_code_trusted`` (however a local folder's path is written)."""
    import transformers

    seen: list[tuple[str, Any]] = []
    for auto in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        cls = getattr(transformers, auto)
        original = cls.from_pretrained.__func__

        def spy(klass: Any, name: str, *args: Any, _original: Any = original, _auto: str = auto, **kwargs: Any) -> Any:
            assert "trust_remote_code" in kwargs, f"{_auto}.from_pretrained called without trust_remote_code"
            seen.append((_auto, kwargs["trust_remote_code"]))
            return _original(klass, name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    from kdbench.zoo import config_vocab_size

    load_model(str(tiny_folder)), load_tokenizer(str(tiny_folder)), config_vocab_size(str(tiny_folder))
    assert {auto for auto, _ in seen} == {"AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"}
    assert not any(trusted for _, trusted in seen)
    seen.clear()
    with remote_code_trusted([str(tiny_folder / ".." / "model")]):
        load_model(str(tiny_folder)), load_tokenizer(str(tiny_folder))
        assert seen and all(trusted for _, trusted in seen)
        seen.clear()
        with remote_code_trusted(["someone/else"]):
            load_tokenizer(str(tiny_folder))
    assert seen and not any(trusted for _, trusted in seen)


def test_a_checkpoint_with_its_own_code_is_refused_and_its_code_never_runs(tiny_folder: Path, tmp_path: Path) -> None:
    """A folder whose config points at Python code it ships: loading it without trust is a KdbenchError that says
    how to allow it, and the code is never imported."""
    folder = tmp_path / "custom"
    folder.mkdir()
    for file in tiny_folder.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    marker = tmp_path / "code-ran"
    (folder / "custom_model.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("ran")
        from transformers import GPT2Config, GPT2LMHeadModel

        class CustomConfig(GPT2Config):
            model_type = "kdbench-custom"

        class CustomModel(GPT2LMHeadModel):
            config_class = CustomConfig
    """))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="kdbench-custom", auto_map={"AutoConfig": "custom_model.CustomConfig",
                                                         "AutoModelForCausalLM": "custom_model.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(KdbenchError, match="models.trust_remote_code"):
        load_model(str(folder))
    assert not marker.exists()


def test_trust_remote_code_names_resolve_like_model_paths(tmp_path: Path) -> None:
    """A relative folder in models.trust_remote_code is resolved against the experiment file, as models.teachers
    is, so the two name the same checkpoint; hub names stay as written."""
    (tmp_path / "teachers" / "gpt2").mkdir(parents=True)
    raw = {"name": "t", "protocol": "uniform", "training": {"max_steps": 1},
           "models": {"teachers": {"gpt2": "teachers/gpt2"}, "trust_remote_code": ["teachers/gpt2", "org/model"]}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(raw))
    models = load_experiment(tmp_path / "t.yaml").models
    assert models.trust_remote_code == [models.teachers["gpt2"], "org/model"]
    assert Path(models.teachers["gpt2"]).is_absolute()


def test_models_trained_from_a_trusted_checkpoint_are_trusted_and_nothing_else(tmp_path: Path) -> None:
    """The cache folders of models trained from a trusted checkpoint inherit the trust (they carry its code);
    the teacher's, trained from an untrusted one, do not."""
    from kdbench.grid.collect import collect
    from kdbench.grid.graph import StageKind
    from kdbench.grid.security import trusted_models
    from kdbench.grid.selection import resolve_selection

    experiment = load_experiment(None).model_copy(deep=True)
    models = experiment.models.model_copy(update={"scale": "paper", "families": ["gpt2"], "students": ["120M"],
                                                  "teachers": {}, "sft_inits": {}, "trust_remote_code": ["gpt2"]})
    experiment = experiment.model_copy(update={"models": models, "teacher": experiment.teacher.model_copy(
        update={"train": True})})
    registries = load_registries()
    graph = collect(experiment, registries, resolve_selection(experiment, registries, ["sft", "kd"], ["gpt2"], 1))
    trusted = trusted_models(experiment, graph, tmp_path)
    trained = [node for node in graph if node.kind is StageKind.TRAIN]
    from_student = {str(tmp_path / "train" / n.key) for n in trained if graph.start_of(n.key).spec.path == "gpt2"}
    assert from_student and trusted == {"gpt2", *from_student}
    assert any(graph.start_of(n.key).spec.path == "gpt2-xl" for n in trained)  # the teacher's SFT: not trusted
    assert trusted_models(experiment.model_copy(update={"models": models.model_copy(
        update={"trust_remote_code": []})}), graph, tmp_path) == set()


# -- weights and pickles ----------------------------------------------------------------------------------

def test_weights_kdbench_writes_are_safetensors(tiny_folder: Path, tmp_path: Path) -> None:
    """A model built by kdbench, and one trained and saved by the engine: safetensors and JSON, never a pickle."""
    from kdbench.config import TrainingConfig
    from kdbench.data import TokenizedExample
    from kdbench.train.engine import TrainingData, train

    tokenizer = load_tokenizer(str(tiny_folder))
    examples = [TokenizedExample(tokenizer(f"sample text number {i}")["input_ids"] + [tokenizer.eos_token_id], 2)
                for i in range(8)]
    sft = load_registries().objectives.get("sft")
    train(load_model(str(tiny_folder)), sft, sft.make_params({}),
          TrainingData(examples, tokenizer.pad_token_id, tokenizer.eos_token_id),
          TrainingConfig(engine="accelerate", batch_size=4, max_steps=1, threads=1), 0, save_to=tmp_path / "trained",
          tokenizer=tokenizer)
    for folder in (tiny_folder, tmp_path / "trained"):
        suffixes = {p.suffix for p in folder.iterdir()}
        assert ".safetensors" in suffixes, folder
        assert not suffixes & {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}, (folder, suffixes)


def calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """Every call in ``tree`` with its dotted callee (``torch.load``, ``subprocess.run``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, target = [], node.func
            while isinstance(target, ast.Attribute):
                parts.append(target.attr)
                target = target.value
            parts.append(target.id if isinstance(target, ast.Name) else "<expression>")  # (x()).eval is no eval
            found.append((".".join(reversed(parts)), node))
    return found


def keyword(call: ast.Call, name: str) -> Any:
    value = next((k.value for k in call.keywords if k.arg == name), None)
    return value.value if isinstance(value, ast.Constant) else value


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_unsafe_loading_or_shell_in_the_code_base(path: Path) -> None:
    """In kdbench and the built-in plugins: ``torch.load`` only with ``weights_only=True``; no pickle or unsafe
    YAML loading; no weights saved without safetensors; no shell, and every subprocess gets an argument list
    (a user string is then one argument, never shell syntax); no eval/exec of strings."""
    problems = []
    for callee, call in calls(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.relative_to(REPO)}:{call.lineno}: {callee}"
        if callee.endswith("torch.load") and keyword(call, "weights_only") is not True:
            problems.append(f"{where} without weights_only=True")
        if callee in ("pickle.load", "pickle.loads", "dill.load", "yaml.load", "yaml.unsafe_load", "marshal.loads"):
            problems.append(f"{where}: unsafe deserialisation")
        if callee.endswith(("save_pretrained", "save_model")) and keyword(call, "safe_serialization") is False:
            problems.append(f"{where} with safe_serialization=False")
        if callee in ("os.system", "os.popen", "eval", "exec") or callee.startswith("os.exec") or callee.startswith(
                "os.spawn"):
            problems.append(f"{where}: runs a string")
        if callee.startswith(("subprocess.", "asyncio.create_subprocess")):
            if keyword(call, "shell") is not None:
                problems.append(f"{where} with shell=")
            if call.args and isinstance(call.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                problems.append(f"{where} with a command string instead of an argument list")
    assert not problems, "\n".join(problems)


# -- plugins ----------------------------------------------------------------------------------------------

MARKING_PLUGIN = '''
from pathlib import Path
Path({marker!r}).write_text("imported")

from kdbench import hookimpl
from kdbench_plugins.kd import KD


class Marked(KD):
    name = "marked-kd"


@hookimpl
def kdbench_register_objectives():
    return [Marked]
'''


def test_blocked_entry_points_and_distributions_are_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """KDBENCH_BLOCK_PLUGINS=tvd,metrics: those entry points are never imported and their names are gone; a
    distribution's name blocks all of its entry points."""
    import importlib.metadata

    loaded: list[str] = []
    original = importlib.metadata.EntryPoint.load
    monkeypatch.setattr(importlib.metadata.EntryPoint, "load", lambda self: (loaded.append(self.name), original(self))[1])
    monkeypatch.setenv(BLOCK_ENV, "tvd, metrics")
    registries = load_registries()
    assert "tvd" not in registries.objectives and "kd" in registries.objectives
    assert len(registries.metrics) == 0
    assert {"tvd", "metrics"}.isdisjoint(loaded) and "kd" in loaded
    monkeypatch.setenv(BLOCK_ENV, "KDBench")  # the distribution, spelt as pip would accept it
    assert len(load_registries().objectives) == 0


def test_a_blocked_plugin_file_is_never_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "marking.py").write_text(MARKING_PLUGIN.format(marker=str(marker)))
    monkeypatch.setenv(BLOCK_ENV, "marking")
    assert "marked-kd" not in load_registries(plugins).objectives
    assert not marker.exists()
    monkeypatch.delenv(BLOCK_ENV)
    assert "marked-kd" in load_registries(plugins).objectives and marker.exists()


def test_a_misspelt_block_is_an_error_not_a_silent_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BLOCK_ENV, "tvdd")
    with pytest.raises(KdbenchError, match=r"KDBENCH_BLOCK_PLUGINS names \['tvdd'\], which match no plugin"):
        load_registries()


def test_a_blocked_objective_is_an_unknown_name_on_the_command_line(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """From the CLI: with kd blocked, `kdbench run --methods kd` is the usual unknown-name error (exit 2)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(BLOCK_ENV, "kd")
    result = CliRunner().invoke(app, ["run", "--dry-run", "--methods", "kd"])
    assert isinstance(result.exception, KdbenchError) and "unknown objective 'kd'" in str(result.exception)
