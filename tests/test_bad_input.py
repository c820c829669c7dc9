"""Bad input, as a user gives it: every mistake is one message (what was given, what was expected, how to fix it),
exit code 2, no traceback, and nothing already written is touched.

Most cases call the command in-process (``kdbench run --dry-run`` where that suffices: it checks everything but
loads nothing); a few run it for real (they stop before any stage) and one goes through the installed console
script. The property-based tests generate broken experiment files from a valid one and check that none of them
gets a traceback; the number tried is reported at the end of the module.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.errors import KdbenchError
from kdbench.registry import load_registries
from kdbench.zoo import build_tiny_model, train_tokenizer

KDBENCH = Path(sys.executable).parent / "kdbench"
# A small valid experiment (the end-to-end test's, two methods): every generated file starts from it.
BASE: dict[str, Any] = {
    "name": "bad-input",
    "protocol": "uniform",
    "data": {"dataset": "tiny", "options": {"n_train": 120, "n_validation": 8, "n_test": 8},
             "max_length": 64, "max_prompt_length": 48},
    "models": {"scale": "tiny", "families": ["gpt2"]},
    "init": {"start": "base"},
    "training": {"engine": "accelerate", "lr": 5.0e-3, "batch_size": 8, "max_steps": 2},
    "selection": {"every": 2, "metric": "loss"},
    "methods": {"sft": {}, "kd": {"kd_ratio": 0.5}},
    "evaluation": {"seeds": [10], "max_new_tokens": 8, "batch_size": 8},
}


def invoke(*args: str) -> tuple[int, str]:
    """``kdbench ARGS`` in this process, as ``kdbench.cli.main`` runs it: a ``KdbenchError`` is exit code 2 with its
    message; any other exception is a traceback, which fails the test."""
    result = CliRunner().invoke(app, list(args))
    if isinstance(result.exception, KdbenchError):
        return 2, str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"kdbench {' '.join(args)} raised a traceback") from result.exception
    return result.exit_code, result.output


def write(path: Path, raw: Any) -> Path:
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def with_changes(**changes: Any) -> dict[str, Any]:
    """``BASE`` with top-level sections replaced; nested keys as ``section__key``."""
    raw = copy.deepcopy(BASE)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    return raw


@pytest.fixture()
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder to run in, with its own cache, so nothing lands in the repository or ~/.cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def expect_error(args: list[str], *fragments: str) -> str:
    code, message = invoke(*args)
    assert code == 2, (code, message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# -- the experiment file ---------------------------------------------------------------------------

FILE_CASES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "malformed YAML": ("name: [unclosed\nprotocol: uniform\n", ("not valid YAML", "line ", "column ")),
    "a list, not a mapping": ("- name\n- protocol\n", ("must hold a YAML mapping", "got a list")),
    "a scalar, not a mapping": ("just words\n", ("must hold a YAML mapping", "got a str")),
    "an empty file": ("", ("is empty", "expected a YAML mapping")),
    "a mistyped top-level field": ({**{k: v for k, v in BASE.items() if k != "training"}, "trainng": BASE["training"]},
                                   ("trainng: not a field of the experiment", "did you mean 'training'",
                                    "training: Field required")),
    "a mistyped nested field": (with_changes(training={**BASE["training"], "lrr": 1e-3}),
                                ("training.lrr: not a field of training", "did you mean 'lr'")),
    "a mistyped field of a dict of configs": (
        with_changes(evaluation={**BASE["evaluation"], "datasets": {"si": {"datset": "selfinst"}}}),
        ("evaluation.datasets.si.datset: not a field of evaluation.datasets.si", "did you mean 'dataset'")),
    "a wrong type": (with_changes(training__lr="fast"), ("training.lr:", "given: 'fast'")),
    "an out-of-range number": (with_changes(training__batch_size=0), ("training.batch_size:", "greater than or equal to 1")),
    "an out-of-range objective parameter": (with_changes(methods={"kd": {"kd_ratio": 5}}),
                                            ("methods.kd.kd_ratio must be in [0, 1], got 5.0",)),
    "a misspelt objective parameter": (with_changes(methods={"kd": {"temprature": 2.0}}),
                                       ("methods.kd.temprature", "did you mean 'temperature'")),
    "an unknown method": (with_changes(methods={"kdd": {}}), ("methods.kdd", "Did you mean 'kd'")),
    "an unknown family": (with_changes(models__families=["gtp2"]), ("models.families", "Did you mean 'gpt2'")),
    "an unknown dataset": (with_changes(data__dataset="tinny"), ("data.dataset", "Did you mean 'tiny'")),
    "an unknown metric": (with_changes(evaluation={**BASE["evaluation"], "metrics": ["rouge"]}),
                          ("evaluation.metrics", "unknown metric 'rouge'")),
    "a name that is no folder name": (with_changes(name="../elsewhere"), ("name:", "must be a folder name")),
    "student paths at tiny scale": (with_changes(models={**BASE["models"], "student_paths": {"gpt2": {"s1": "x"}}}),
                                    ("models.student_paths.gpt2", "apply at scale paper")),
    "an untrusted-code entry naming no model": (
        with_changes(models={**BASE["models"], "trust_remote_code": ["evil/model"]}),
        ("models.trust_remote_code: 'evil/model' is not a checkpoint of this experiment",)),
    "SFT inits for a family not run": (with_changes(models={**BASE["models"], "sft_inits": {"llama": "inits/llama"}}),
                                       ("models.sft_inits.llama: not one of models.families",)),
    "SFT inits no method reads": (with_changes(models={**BASE["models"], "sft_inits": {"gpt2": "inits/gpt2"}}),
                                  ("models.sft_inits: given, but init.start is base",)),
    "SFT inits without a seed's folder": (with_changes(models={**BASE["models"], "sft_inits": {"gpt2": "/nonexistent"}},
                                                       init={"start": "sft"}),
                                          ("models.sft_inits.gpt2 = /nonexistent holds no SFT init", "export-inits")),
    "bases for a family not run": (with_changes(models={**BASE["models"], "bases": {"llama": "bases/llama"}}),
                                   ("models.bases.llama: not one of models.families",)),
    "bases without a student's folder": (with_changes(models={**BASE["models"], "bases": {"gpt2": "/nonexistent"}}),
                                         ("models.bases.gpt2 = /nonexistent holds no base model", "export-bases")),
    "pretraining at paper scale": (
        with_changes(models={"scale": "paper", "families": ["gpt2"], "students": ["120M"]},
                     pretrain={"corpus": {"dataset": "tiny"}, "training": BASE["training"]}),
        ("pretrain: pretraining applies to tiny models", "models.scale is 'paper'")),
    "a pretraining corpus that is no corpus": (
        with_changes(pretrain={"corpus": {"dataset": "jsonl"}, "training": BASE["training"]}),
        ("pretrain.corpus.dataset: 'jsonl' has no plain-text corpus",)),
    "a teacher set with an unknown option": (
        with_changes(teacher={"data": {"dataset": "tiny", "options": {"gold": "clean", "n_trian": 10}}}),
        ("teacher.data.options.n_trian: not an option of dataset 'tiny'",)),
    "a teacher path that does not exist": (
        with_changes(models={**BASE["models"], "teachers": {"gpt2": "/nonexistent/teacher"}}),
        ("gpt2/teacher: /nonexistent/teacher does not exist", "expected a model folder")),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_a_broken_experiment_file_is_one_message(case: str, work: Path) -> None:
    """Each mistake in the file is named with its path, what was given and what was expected; exit code 2."""
    content, fragments = FILE_CASES[case]
    expect_error(["run", "--dry-run", "--experiment", str(write(work / "bad.yaml", content))], *fragments)


def test_experiment_paths_that_are_not_files(work: Path) -> None:
    """A missing file, a folder and a binary file each say what the path is and what was expected."""
    expect_error(["run", "--dry-run", "-e", "absent.yaml"], "absent.yaml does not exist", "expected a YAML file")
    (work / "folder.yaml").mkdir()
    expect_error(["run", "--dry-run", "-e", "folder.yaml"], "folder.yaml is a folder", "Pass the file inside it")
    (work / "binary.yaml").write_bytes(b"\x00\xff\xfe\x00")
    expect_error(["run", "--dry-run", "-e", "binary.yaml"], "binary.yaml is not UTF-8 text")


def test_teacher_paths_that_are_not_model_folders(work: Path) -> None:
    """A file, or a folder without a config, as models.teachers: refused before anything runs."""
    (work / "a-file").write_text("x")
    (work / "empty").mkdir()
    for teacher, fragment in (("a-file", "is a file; expected a model folder"), ("empty", "holds no config.json")):
        raw = with_changes(models={**BASE["models"], "teachers": {"gpt2": str(work / teacher)}})
        expect_error(["run", "--dry-run", "-e", str(write(work / "bad.yaml", raw))], fragment)


# -- the command line --------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "fragments"), [
    (["--methods", ""], ("--methods '' names nothing", "Leave --methods out")),
    (["--methods", " , "], ("--methods ' , ' names nothing",)),
    (["--models", ","], ("--models ',' names nothing", "gpt2,opt")),
    (["--methods", "kdd"], ("unknown objective 'kdd'", "Did you mean 'kd'")),
    (["--models", "gpt3"], ("unknown model family 'gpt3'",)),
    (["--students", "s9"], ("models.students ['s9'] are not students of gpt2", "available: ['s1', 's2']")),
    (["--students", ","], ("--students ',' names nothing",)),
    (["--engine", "jax"], ("--engine 'jax' is not an engine",)),
    (["--plugins-dir", "a-file"], ("--plugins-dir a-file is not a directory",)),
    (["--out", "a-file"], ("--out a-file: a-file is a file", "Pass another --out")),
    (["--out", "a-file/results"], ("no folder can be made under it",)),
    (["--cache-dir", "a-file"], ("the cache folder a-file: a-file is a file", "KDBENCH_CACHE_DIR")),
])
def test_bad_options(args: list[str], fragments: tuple[str, ...], work: Path) -> None:
    """Options naming nothing, unknown names, files where folders belong: exit 2 with the option named."""
    (work / "a-file").write_text("x")
    experiment = write(work / "ok.yaml", BASE)
    expect_error(["run", "--dry-run", "-e", str(experiment), *args], *fragments)


@pytest.mark.parametrize("option", ["--out", "--cache-dir"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry run", "run"])
def test_a_symlink_to_a_missing_folder_names_the_link_and_its_target(option: str, dry_run: bool, work: Path) -> None:
    """A link into scratch space that was wiped: not "File exists" from mkdir, but the link, where it points and
    how to fix it; nothing is created at the target."""
    (work / "results").symlink_to(work / "wiped-scratch" / "results")
    experiment = write(work / "ok.yaml", BASE)
    expect_error(["run", *(["--dry-run"] if dry_run else []), "-e", str(experiment), option, "results"],
                 f"results is a symbolic link to {work / 'wiped-scratch' / 'results'}, which does not exist",
                 f"mkdir -p {work / 'wiped-scratch' / 'results'}", "or remove the link")
    assert not (work / "wiped-scratch").exists()


def test_export_bases_needs_a_pretrain_block(work: Path) -> None:
    """Bases are what a pretrain block trains: an experiment without one has none to export, said before anything."""
    expect_error(["export-bases", "--out", "bases", "-e", str(write(work / "no-pretrain.yaml", BASE))],
                 "has no pretrain block", "add pretrain:")
    assert not (work / "cache").exists()


def test_report_of_a_file_or_missing_folder(work: Path) -> None:
    (work / "a-file").write_text("x")
    expect_error(["report", "a-file"], "a-file is a file", "results folder")
    expect_error(["report", "absent"], "does not exist")


# -- found before anything runs, and nothing already written is touched -------------------------------

def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by content hash and modification time."""
    return {str(p.relative_to(root)): f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def finished_results(work: Path) -> Path:
    """A results folder holding one finished cell, as an earlier run left it."""
    out = work / "out"
    cell = out / "cells" / "gpt2" / "s1" / "sft" / "seed0"
    cell.mkdir(parents=True)
    (cell / "result.json").write_text(json.dumps({"status": "ok", "key": "0123456789abcdef", "metrics": {}}))
    (cell / "samples.json").write_text("[]")
    (out / "leaderboard.md").write_text("| kept |\n")
    return out


@pytest.mark.parametrize("mistake", ["missing teacher", "cache is a file", "empty --methods", "empty split",
                                     "mistyped field"])
def test_a_real_run_with_a_mistake_stops_before_any_stage_and_keeps_results(mistake: str, work: Path,
                                                                             finished_results: Path) -> None:
    """Not a dry run: the mistake is still found before any stage runs (no cache entry, no new result), and the
    results folder with its finished cell is exactly as it was."""
    (work / "a-file").write_text("x")
    raw, extra = copy.deepcopy(BASE), []
    if mistake == "missing teacher":
        raw["models"]["teachers"] = {"gpt2": str(work / "no-teacher")}
    elif mistake == "cache is a file":
        extra = ["--cache-dir", str(work / "a-file")]
    elif mistake == "empty --methods":
        extra = ["--methods", ""]
    elif mistake == "empty split":
        raw["data"]["options"]["n_validation"] = 0
    else:
        raw["training"]["max_stpes"] = 3
    before = snapshot(finished_results)
    code, message = invoke("run", "-e", str(write(work / "bad.yaml", raw)), "--out", str(finished_results), *extra)
    assert code == 2, message
    assert snapshot(finished_results) == before
    assert not any(p.is_dir() and p.name != ".locks" for p in (work / "cache").glob("*")), "a stage ran"


def test_empty_split_names_the_split(work: Path) -> None:
    raw = with_changes(data={**BASE["data"], "options": {**BASE["data"]["options"], "n_validation": 0}})
    expect_error(["run", "-e", str(write(work / "bad.yaml", raw)), "--out", "out"],
                 "the validation split of dataset 'tiny'", "holds no record")


def test_prompts_all_over_max_prompt_length_stop_before_training(work: Path) -> None:
    """Every prompt longer than data.max_prompt_length: the shortest prompt's length is given and how to fix it;
    only the tokenizer (built from the data) exists by then, nothing trained."""
    raw = with_changes(data={**BASE["data"], "max_prompt_length": 5})
    message = expect_error(["run", "-e", str(write(work / "long.yaml", raw)), "--out", "out"],
                           "train prompts of dataset 'tiny' are longer than data.max_prompt_length=5",
                           "Raise data.max_prompt_length to")
    assert "the shortest has" in message
    assert not (work / "cache" / "train").exists() and not (work / "out" / "cells").exists()


# -- vocabularies ------------------------------------------------------------------------------------

def tiny_folder(root: Path, name: str, texts: list[str], vocab: int, extra_embeddings: int = 0) -> Path:
    """A tiny GPT-2 model folder with its own tokenizer (trained on ``texts``), its embedding grown by
    ``extra_embeddings`` rows beyond the tokenizer (as checkpoints padded to a multiple of 64 are)."""
    tokenizer = train_tokenizer(texts, vocab, root / f"{name}-tokenizer")
    family = load_registries().families.get("gpt2")

    class Padded:  # the tokenizer as build_tiny_model reads it, with a larger length
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __len__(self) -> int:
            return len(self.inner) + extra_embeddings

        def __getattr__(self, attribute: str) -> Any:
            return getattr(self.inner, attribute)

    build_tiny_model(family, family.tiny_students["s1"], Padded(tokenizer), 64, 0, root / name)
    tokenizer.save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    texts = [f"record {i}: the {c} fox" for i in range(50) for c in ("red", "blue", "green")]
    return {"teacher": tiny_folder(root, "teacher", texts, 300),
            "other-tokenizer": tiny_folder(root, "other", [t.upper() for t in texts], 320),
            "padded": tiny_folder(root, "padded", texts, 300, extra_embeddings=8)}


@pytest.mark.parametrize(("student", "fragment"), [("other-tokenizer", "do not share a vocabulary"),
                                                   ("padded", "has config.vocab_size")])
def test_mismatched_vocabularies_are_refused_before_training(student: str, fragment: str, work: Path,
                                                             vocab_models: dict[str, Path]) -> None:
    """Paper scale with local folders: a student whose tokenizer differs, or whose config.vocab_size (the logits'
    width) differs with the same tokenizer, is refused before any stage."""
    raw = with_changes(models={"scale": "paper", "families": ["gpt2"], "students": ["120M"],
                               "teachers": {"gpt2": str(vocab_models["teacher"])},
                               "student_paths": {"gpt2": {"120M": str(vocab_models[student])}}})
    message = expect_error(["run", "-e", str(write(work / "vocab.yaml", raw)), "--out", "out"], fragment)
    assert str(vocab_models["teacher"]) in message
    assert not (work / "cache" / "train").exists()


def test_a_shipped_teacher_whose_logits_outnumber_its_tokenizer(work: Path, vocab_models: dict[str, Path]) -> None:
    """Tiny scale: students are built from the teacher's tokenizer, so a teacher with more logits than tokens
    cannot be distilled token by token."""
    raw = with_changes(models={"scale": "tiny", "families": ["gpt2"], "teachers": {"gpt2": str(vocab_models["padded"])}},
                       teacher={"train": False})
    expect_error(["run", "-e", str(write(work / "vocab.yaml", raw)), "--out", "out"], "has config.vocab_size",
                 "gpt2/s1/seed0")


@pytest.mark.parametrize("command", [["run", "--out", "out"], ["export-inits", "--out", "inits"]])
def test_shipped_bases_with_another_tokenizer_than_the_shipped_teacher(command: list[str], work: Path,
                                                                       vocab_models: dict[str, Path]) -> None:
    """A shipped teacher and shipped bases made with different tokenizers (a teacher left from an older suite) are
    refused before anything trains, by a run and by the export that would train the SFT inits on the mismatch."""
    bases = work / "bases" / "gpt2"
    bases.mkdir(parents=True, exist_ok=True)
    if not (bases / "s1").exists():
        (bases / "s1").symlink_to(vocab_models["other-tokenizer"], target_is_directory=True)
    raw = with_changes(models={"scale": "tiny", "families": ["gpt2"], "students": ["s1"], "bases": {"gpt2": str(bases)},
                               "teachers": {"gpt2": str(vocab_models["teacher"])}},
                       teacher={"train": False}, init={"start": "sft"})
    expect_error([command[0], "-e", str(write(work / "bases.yaml", raw)), *command[1:]], "do not share a vocabulary")
    assert not (work / "cache" / "train").exists()


# -- as a user runs it ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_console_script_prints_one_paragraph_and_exits_2(tmp_path: Path,
                                                         subprocess_env: Callable[..., dict[str, str]]) -> None:
    """The installed command: exit 2, the message on stderr after 'error:', no traceback, nothing written."""
    bad = write(tmp_path / "bad.yaml", with_changes(training__lr=-1))
    done = subprocess.run([str(KDBENCH), "run", "--experiment", str(bad), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "training.lr: Input should be greater than 0" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# -- generated broken files ----------------------------------------------------------------------------

TRIED: Counter[str] = Counter()  # outcome → generated experiment files, for the module's closing line


@pytest.fixture(scope="module", autouse=True)
def report_tally(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if TRIED:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        line = (f"bad-input property tests: {sum(TRIED.values())} generated experiment files, none with a traceback "
                f"({', '.join(f'{n} {outcome}' for outcome, n in sorted(TRIED.items()))})")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():  # shown under -q too, without -s
                reporter.write_line(f"\n{line}")
        cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
        log = cache.mkdir("kdbench") / "bad-configs.json" if cache is not None else None
        if log is not None:
            log.write_text(json.dumps(dict(TRIED)))


def leaf_paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a nested mapping (mappings and their leaves)."""
    paths = []
    if isinstance(value, dict):
        for key, child in value.items():
            paths.append((*prefix, key))
            paths += leaf_paths(child, (*prefix, key))
    return paths


PATHS = leaf_paths(BASE)
junk = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=6), st.integers(-2, 2), max_size=2))
key_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


# The tiny suite's sizes are generated, not read: a huge n_train would make the dry run (which counts the records)
# build billions of them, so data.options get values that are wrong but small.
small_junk = st.sampled_from([None, "abc", -5, 0, 1.5, True, [1], {"a": 1}])


@st.composite
def mutation(draw: st.DrawFn) -> tuple[str, tuple[str, ...], Any]:
    kind = draw(st.sampled_from(["delete", "replace", "unknown key", "misspell", "out of range"]))
    path = draw(st.sampled_from(PATHS))
    if path[:2] == ("data", "options") and kind in ("replace", "out of range"):
        return "replace", path, draw(small_junk)
    return kind, path, draw(junk if kind == "replace" else key_text)


def parent_of(raw: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = raw
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) and path[-1] in node else None


def mutate(raw: dict[str, Any], kind: str, path: tuple[str, ...], value: Any) -> str | None:
    """Apply one mutation in place; returns the key it is about (for the message check), or None if it did nothing."""
    parent = parent_of(raw, path)
    if parent is None:
        return None
    key = path[-1]
    if kind == "delete":
        del parent[key]
    elif kind == "replace":
        parent[key] = value
    elif kind == "unknown key":
        target = parent[key] if isinstance(parent[key], dict) else parent
        target[f"x{value}"] = 1
        return f"x{value}"
    elif kind == "misspell":
        parent[key[:-1] + key[-1:] * 2 if len(key) > 1 else key + "_"] = parent.pop(key)
    else:
        current = parent[key]
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            return None
        parent[key] = -abs(current) - 1 if len(value) % 2 else current * 10**9
    return key


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(mutations=st.lists(mutation(), min_size=1, max_size=3))
def test_generated_broken_experiments_never_print_a_traceback(mutations: list[tuple[str, tuple[str, ...], Any]],
                                                              work: Path) -> None:
    """Deleted keys, wrong types, unknown or misspelt keys, out-of-range numbers, alone or together: the dry run
    succeeds or exits 2 with a message that names something it was given."""
    raw = copy.deepcopy(BASE)
    touched = [key for key in (mutate(raw, *m) for m in mutations) if key is not None]
    code, message = invoke("run", "--dry-run", "--experiment", str(write(work / "generated.yaml", raw)))
    TRIED[f"exit {code}"] += 1
    assert code in (0, 2), message
    if code == 2:
        assert message.strip() and "Traceback" not in message
        named = [key for key in touched if str(key) in message] + [p for p in ("generated.yaml", "methods", "data")
                                                                     if p in message]
        assert named, (touched, message)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200),
                      st.lists(st.sampled_from(["name: x", "protocol: [", "training: {lr: 1", "\t- a", "? ", ": :",
                                                "{", "}", "---", "&a", "*a", "!!python/object:os.system", "'", '"',
                                                "methods: {kd: [1]}", "- 1", "%YAML 1.1", "\x00"]),
                               max_size=6).map("\n".join)))
def test_generated_garbage_text_never_prints_a_traceback(text: str, work: Path) -> None:
    """Garbage YAML text and non-mapping documents: exit 2 with a message naming the file."""
    (work / "garbage.yaml").write_text(text, encoding="utf-8")
    code, message = invoke("run", "--dry-run", "--experiment", "garbage.yaml")
    TRIED[f"exit {code}"] += 1
    assert code in (0, 2), message
    if code == 2:
        assert "garbage.yaml" in message, message
