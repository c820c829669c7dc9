"""The model zoo: families, paper-scale checkpoint names, tiny models through from_pretrained, and the
vocabulary check that runs before any training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kdbench.config import load_experiment
from kdbench.data import TEMPLATE_PIECES
from kdbench.errors import KdbenchError
from kdbench.grid.collect import collect
from kdbench.grid.graph import StageKind
from kdbench.grid.selection import resolve_selection
from kdbench.registry import load_registries
from kdbench.zoo import build_tiny_model, check_same_vocabulary, count_parameters, train_tokenizer
from kdbench_plugins.families import GPT2, OPT, TINY_STUDENTS, TINY_TEACHER

TEXTS = [f"### Response:\n{w} {n} and {w.upper()}" for n in range(40) for w in ("apple", "pear", "drum", "oak")]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, 300, folder, TEMPLATE_PIECES)
    return folder


def test_paper_scale_names_the_papers_checkpoints() -> None:
    assert GPT2.checkpoints("paper") == ("gpt2-xl", {"120M": "gpt2", "340M": "gpt2-medium", "760M": "gpt2-large"})
    teacher, students = OPT.checkpoints("paper")
    assert teacher == "facebook/opt-13b"
    assert set(students.values()) == {"facebook/opt-1.3b", "facebook/opt-2.7b", "facebook/opt-6.7b"}


def test_paper_scale_resolution_takes_local_path_overrides(tmp_path: Path) -> None:
    """At paper scale nothing is built: hub names pass through, local paths replace them where given."""
    experiment = load_experiment(None).model_copy(deep=True)
    models = experiment.models.model_copy(update={"scale": "paper", "students": ["120M"],
                                                  "teachers": {"gpt2": "/models/gpt2-xl-sft"}, "sft_inits": {}})
    experiment = experiment.model_copy(update={"models": models})
    registries = load_registries()
    graph = collect(experiment, registries, resolve_selection(experiment, registries, ["sft"], ["gpt2"], None))
    checkpoints = [(n.label, n.spec.path) for n in graph if n.kind is StageKind.CHECKPOINT]
    assert checkpoints == [("gpt2/gpt2-xl", "/models/gpt2-xl-sft"), ("gpt2/120M", "gpt2")]
    assert not any(n.kind in (StageKind.TOKENIZER, StageKind.INIT) for n in graph)  # nothing is built at paper scale
    keys = {n.label: n.key for n in graph if n.kind is StageKind.CHECKPOINT}
    assert graph.same_vocabulary == [(keys["gpt2/gpt2-xl"], keys["gpt2/120M"])]  # checked before anything trains


@pytest.mark.parametrize("family,model_type", [(GPT2, "gpt2"), (OPT, "opt")])
def test_tiny_models_are_ordinary_hf_folders(family: object, model_type: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    build_tiny_model(family, TINY_TEACHER, tokenizer, 64, 0, tmp_path / "teacher")
    build_tiny_model(family, TINY_STUDENTS["s1"], tokenizer, 64, 0, tmp_path / "student")
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path / "teacher").model_type == model_type
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert teacher.config.vocab_size == student.config.vocab_size == len(tokenizer)
    assert count_parameters(teacher) > 10 * count_parameters(student)
    assert AutoTokenizer.from_pretrained(tmp_path / "student").get_vocab() == tokenizer.get_vocab()
    # the seed decides the initialisation, and only the seed: each training seed gets its own student
    build_tiny_model(family, TINY_STUDENTS["s1"], tokenizer, 64, 0, tmp_path / "again")
    build_tiny_model(family, TINY_STUDENTS["s1"], tokenizer, 64, 1, tmp_path / "other")
    weights = {name: dict(AutoModelForCausalLM.from_pretrained(tmp_path / name).named_parameters())
               for name in ("student", "again", "other")}
    assert all(torch.equal(p, weights["again"][n]) for n, p in weights["student"].items())
    assert not all(torch.equal(p, weights["other"][n]) for n, p in weights["student"].items())


def test_vocabulary_mismatch_is_a_clear_error(tokenizer_dir: Path, tmp_path: Path) -> None:
    other = train_tokenizer([t.replace("apple", "zebra") for t in TEXTS], 320, tmp_path / "other")
    same = AutoTokenizer.from_pretrained(tokenizer_dir)
    check_same_vocabulary(same, AutoTokenizer.from_pretrained(tokenizer_dir), "t", "s")  # no error
    with pytest.raises(KdbenchError, match="do not share a vocabulary") as error:
        check_same_vocabulary(same, other, "teacher-path", "student-path")
    assert "teacher-path" in str(error.value) and "student-path" in str(error.value)

