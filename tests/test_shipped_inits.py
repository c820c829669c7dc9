"""Shipped SFT inits: `kdbench export-inits` trains the SFT student of every family, student and training seed once,
and an experiment naming the folders in `models.sft_inits` starts its methods from them instead of training them,
with their recorded training in every row's cost."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kdbench.config import load_experiment
from kdbench.errors import KdbenchError
from kdbench.grid.collect import collect
from kdbench.grid.graph import StageKind
from kdbench.grid.selection import resolve_selection
from kdbench.registry import load_registries

pytestmark = pytest.mark.slow  # exports and runs of the shipped models

EXPERIMENT = """
name: small
protocol: uniform
data: {{dataset: tiny, options: {{n_train: 300, n_validation: 10, n_test: 24}}, max_length: 64, max_prompt_length: 48}}
models: {{scale: tiny, families: [gpt2]{inits}}}
teacher: {{training: {{engine: accelerate, lr: 3.0e-3, batch_size: 32, max_steps: 12}}}}
init: {{training: {{engine: accelerate, lr: 5.0e-3, batch_size: 32, max_steps: 4}}}}
training: {{engine: accelerate, lr: 5.0e-3, batch_size: 32, max_steps: 4}}
selection: {{every: 2}}
methods: {{sft: {{}}, kd: {{}}}}
seeds: [0, 1]
evaluation: {{seeds: [10], max_new_tokens: 8, batch_size: 24}}
"""


def shipped_folders(root: Path, seeds: range) -> Path:
    """Model folders where `export-inits` would write them (a config is all collecting reads)."""
    for seed in seeds:
        folder = root / "gpt2" / "s1" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "seed": seed}))
    return root / "gpt2"


def test_methods_start_from_the_shipped_init_of_their_seed_and_nothing_trains_it(tmp_path: Path) -> None:
    registries = load_registries()
    experiment = load_experiment(None)
    shipped = shipped_folders(tmp_path, range(3))
    with_inits = experiment.model_copy(update={"models": experiment.models.model_copy(
        update={"sft_inits": {"gpt2": str(shipped)}})})
    graph = collect(with_inits, registries, resolve_selection(with_inits, registries, ["sft", "kd"], ["gpt2"], 3))
    for cell in graph.cells():
        if cell.spec.kind != "student":
            continue
        init = graph[graph[cell.deps["model"]].deps["init"]]
        assert init.kind is StageKind.CHECKPOINT and init.label == f"gpt2/s1/init/seed{cell.spec.seed}"
        assert init.spec.path == str(shipped / "s1" / f"seed{cell.spec.seed}")
        assert cell.spec.config["student"]["sft_init"] == init.key  # a row's starting point is part of its config
    assert not [node for node in graph if node.kind is StageKind.TRAIN and "/init/" in node.label]
    assert "gpt2/s1/seed0" not in [node.label for node in graph]  # the random initialisation is not needed either
    # another seed than the folder holds is refused before anything runs, saying how to make it
    with pytest.raises(KdbenchError, match="export-inits"):
        collect(with_inits, registries, resolve_selection(with_inits, registries, ["sft"], ["gpt2"], 4))


@pytest.mark.slow
def test_exported_inits_serve_a_run_as_the_inits_it_would_train(tmp_path: Path,
                                                                  subprocess_env: Callable[..., dict[str, str]]) -> None:
    """The rebuild path on a short budget: the exported inits, read back, give exactly the losses of the run that
    trains them itself, and the rows count their recorded training."""
    (tmp_path / "trained.yaml").write_text(EXPERIMENT.format(inits=""))
    (tmp_path / "shipped.yaml").write_text(EXPERIMENT.format(inits=", sft_inits: {gpt2: inits/gpt2}"))
    env = subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache"))

    def kdbench(*args: str, cache: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kdbench", *args], capture_output=True, text=True, timeout=900,
                              env={**env, "KDBENCH_CACHE_DIR": str(tmp_path / cache)})

    exported = kdbench("export-inits", "--out", str(tmp_path / "inits"), "-e", str(tmp_path / "trained.yaml"),
                       cache="export-cache")
    assert exported.returncode == 0, exported.stderr[-3000:]
    for seed in (0, 1):
        stats = json.loads((tmp_path / f"inits/gpt2/s1/seed{seed}/train_stats.json").read_text())
        assert stats["steps"] == 4 and stats["selection"]["metric"] == "loss"
    # One cache for both runs (the teacher trains once): the shipped run's stages start from checkpoint nodes, so no
    # stage of the trained run (whose inits the export's separate cache trained independently) has their keys.
    for name in ("trained", "shipped"):
        done = kdbench("run", "-e", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name), cache="run-cache")
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("gpt2/s1/init/seed0: train" in done.stderr) == (name == "trained")
    for method in ("sft", "kd"):
        for seed in (0, 1):
            cell = f"cells/gpt2/s1/{method}/seed{seed}"
            logs = [[json.loads(line)["loss"] for line in (tmp_path / run / cell / "train_log.jsonl").read_text().splitlines()]
                    for run in ("trained", "shipped")]
            assert logs[0] == logs[1]
            results = [json.loads((tmp_path / run / cell / "result.json").read_text()) for run in ("trained", "shipped")]
            assert results[0]["metrics"] == results[1]["metrics"]
            init = results[1]["cost"]["ancestors"][f"gpt2/s1/init/seed{seed}"]
            assert init == results[0]["cost"]["ancestors"][f"gpt2/s1/init/seed{seed}"] | {"seconds": init["seconds"]}
            assert init["optimizer_steps"] == 4
            assert "models.sft_inits (gpt2: inits/gpt2" in results[1]["protocol_card"]["init"]


REBUILD = """
name: rebuild
protocol: uniform
pretrain: {{corpus: {{dataset: tiny, options: {{corpus_mentions: 200}}}}, select_every: 2, validation_chunks: 4,
           training: {{engine: accelerate, lr: 3.0e-3, batch_size: 16, max_steps: 3}}}}
data: {{dataset: tiny, options: {{n_train: 120, n_validation: 6, n_test: 12}}, max_length: 64, max_prompt_length: 24,
       tokenizer_vocab_size: 400}}
models: {{scale: tiny, families: [gpt2], students: [s1]{shipped}}}
teacher: {{train: {train_teacher}, data: {{dataset: tiny, options: {{gold: clean, n_train: 240}}}},
          training: {{engine: accelerate, lr: 3.0e-3, batch_size: 16, max_steps: 4}}}}
init: {{training: {{engine: accelerate, lr: 5.0e-3, batch_size: 16, max_steps: 3}}}}
training: {{engine: accelerate, lr: 5.0e-3, batch_size: 16, max_steps: 2}}
selection: {{every: 2}}
methods: {{sft: {{}}, kd: {{}}}}
evaluation: {{seeds: [10], max_new_tokens: 8, batch_size: 12}}
"""


@pytest.mark.slow
def test_the_shipped_bases_teachers_and_inits_are_rebuilt_by_kdbench_s_own_commands(
        tmp_path: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    """The tiny suite's rebuild path on a short budget, as experiments/tiny.yaml writes it: `export-bases` pretrains
    every base on the corpus, `export-teachers` tunes the teacher from its shipped base on the teacher's own set,
    `export-inits` trains the SFT init from the student's shipped base; a run naming all three trains only the
    methods' stages, and its rows count the teacher and the init (but no pretraining) in their cost."""
    def experiment(name: str, shipped: str = "", train_teacher: bool = True) -> str:
        (tmp_path / f"{name}.yaml").write_text(REBUILD.format(shipped=shipped, train_teacher=str(train_teacher).lower()))
        return str(tmp_path / f"{name}.yaml")

    def kdbench(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "kdbench", *args], capture_output=True, text=True, timeout=900,
                              env=subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache")))
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    kdbench("export-bases", "--out", str(tmp_path / "bases"), "-e", experiment("scratch"))
    for label in ("teacher", "s1"):
        stats = json.loads((tmp_path / f"bases/gpt2/{label}/train_stats.json").read_text())
        assert stats["steps"] == 3 and stats["selection"]["metric"] == "loss"
    on_bases = experiment("on-bases", ", bases: {gpt2: bases/gpt2}")
    kdbench("export-teachers", "--out", str(tmp_path / "teachers"), "-e", on_bases)
    kdbench("export-inits", "--out", str(tmp_path / "inits"), "-e", on_bases)
    assert json.loads((tmp_path / "teachers/gpt2/train_stats.json").read_text())["steps"] == 4
    assert json.loads((tmp_path / "inits/gpt2/s1/seed0/train_stats.json").read_text())["steps"] == 3

    shipped = experiment("shipped", ", bases: {gpt2: bases/gpt2}, teachers: {gpt2: teachers/gpt2}, "
                                    "sft_inits: {gpt2: inits/gpt2}", train_teacher=False)
    done = kdbench("run", "-e", shipped, "--out", str(tmp_path / "out"))
    for stage in ("base: train", "gpt2/teacher: train", "init/seed0: train"):
        assert stage not in done.stderr
    result = json.loads((tmp_path / "out/cells/gpt2/s1/kd/seed0/result.json").read_text())
    assert {label: cost["optimizer_steps"] for label, cost in result["cost"]["ancestors"].items()} == {
        "gpt2/teacher": 4, "gpt2/s1/init/seed0": 3}
    assert result["optimizer_steps_total"] == 4 + 3 + 2
    assert "shipped in models.bases" in result["protocol_card"]["base"]
