"""Named protocols, what they fix, and what they cost: uniform budgets and inits, paper recipes in the dry run,
the pre-training corpus, and the protocol card every leaderboard prints."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kdbench.config import load_experiment, parse_experiment
from kdbench.errors import KdbenchError
from kdbench.grid.collect import collect
from kdbench.grid.graph import StageKind
from kdbench.grid.plan import build_plan
from kdbench.grid.selection import resolve_selection, semantic_errors
from kdbench.registry import Registries, load_registries
from kdbench.report.card import cards_of, protocol_card, render_card

REPO = Path(__file__).resolve().parents[1]
PAPER_EXPERIMENTS = sorted(p for p in (REPO / "experiments").glob("*.yaml") if "from" in p.name)


@pytest.fixture(scope="module")
def registries() -> Registries:
    return load_registries()


def tiny(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "p", "protocol": "uniform",
        "data": {"dataset": "tiny", "options": {"n_train": 300, "n_validation": 10, "n_test": 20}},
        "models": {"families": ["gpt2"], "students": ["s1"]},
        "training": {"max_steps": 8, "batch_size": 16},
        "init": {"training": {"max_steps": 5, "batch_size": 16}},
        "methods": {"sft": {}, "kd": {}, "seqkd": {}, "minillm": {}, "dpkd": {}, "dpkd-token": {}},
        "seeds": [0, 1],
    }
    raw.update(overrides)
    return raw


def train_nodes(raw: dict[str, Any], registries: Registries) -> dict[str, Any]:
    experiment = parse_experiment(raw, "t")
    graph = collect(experiment, registries, resolve_selection(experiment, registries, None, None, None))
    return {node.label: node for node in graph if node.kind is StageKind.TRAIN}


def test_uniform_gives_every_method_one_start_and_one_budget(registries: Registries) -> None:
    """Every method (sft included) continues from the SFT init of its seed, trained with the same settings and the
    same selection; each seed has its own init."""
    nodes = train_nodes(tiny(), registries)
    for seed in (0, 1):
        init = nodes[f"gpt2/s1/init/seed{seed}"]
        assert init.inputs["selection"]["metric"] == "loss" and init.inputs["training"]["max_steps"] == 5
        cells = [n for label, n in nodes.items() if label.endswith(f"seed{seed}") and "/init/" not in label]
        assert len(cells) == 6 and {n.deps["init"] for n in cells} == {init.key}
        assert len({json.dumps(n.inputs["training"], sort_keys=True) for n in cells}) == 1
        assert {n.inputs["selection"]["metric"] for n in cells} == {"rougeL"}
    assert nodes["gpt2/s1/init/seed0"].key != nodes["gpt2/s1/init/seed1"].key


def test_uniform_from_the_base_model_and_paper_recipes_start_where_they_say(registries: Registries) -> None:
    base = train_nodes(tiny(init={"start": "base"}), registries)
    assert not any("/init/" in label for label in base)
    assert all(base[label].deps["init"] != base[label].key for label in base)
    paper = train_nodes(tiny(protocol="paper", method_training={"minillm": {"max_steps": 3}}), registries)
    init = paper["gpt2/s1/init/seed0"].key
    starts = {label.split("/")[2]: node.deps["init"] for label, node in paper.items() if label.endswith("/seed0")}
    assert {m for m, start in starts.items() if start == init} == {"minillm", "dpkd", "dpkd-token"}
    assert paper["gpt2/s1/minillm/seed0"].inputs["training"]["max_steps"] == 3  # a recipe may set its own length


def test_a_pre_training_term_needs_its_corpus_and_reads_the_teacher(registries: Registries, tmp_path: Path) -> None:
    lines = str(pytest.raises(KdbenchError, parse_experiment, tiny(training={"max_steps": 8, "lm_coef": 1.0}), "t").value)
    assert "lm_data" in lines and "lm_coef" in lines
    raw = tiny(protocol="paper", lm_data={"dataset": "tiny"}, method_training={"kd": {"lm_coef": 1.0}})
    nodes = train_nodes(raw, registries)
    assert "teacher" not in nodes["gpt2/s1/sft/seed0"].deps  # sft reads no teacher unless its LM term distils
    assert nodes["gpt2/s1/kd/seed0"].inputs["training"]["lm_coef"] == 1.0
    sft_with_lm = train_nodes(tiny(protocol="paper", lm_data={"dataset": "tiny"},
                                   method_training={"sft": {"lm_coef": 1.0, "lm_kd_ratio": 0.5}}), registries)
    assert "teacher" in sft_with_lm["gpt2/s1/sft/seed0"].deps  # its word-KD half runs the teacher
    wrong = parse_experiment(tiny(lm_data={"dataset": "dolly"}), "t")
    assert any(e.startswith("lm_data.dataset") for e in semantic_errors(wrong, registries))


def test_openwebtext_reads_a_local_copy_and_refuses_to_be_instructions(registries: Registries, tmp_path: Path) -> None:
    spec = registries.datasets.get("openwebtext")
    (tmp_path / "a.txt").write_text("one document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "two"}) + "\n" + json.dumps({"text": "three"}) + "\n")
    assert spec.corpus is not None
    assert spec.corpus({"path": str(tmp_path)}) == ["one document", "two", "three"]
    assert spec.corpus({"path": str(tmp_path), "max_documents": 2}) == ["one document", "two"]
    with pytest.raises(KdbenchError, match="lm_data"):
        spec.load({})


@pytest.mark.parametrize("path", PAPER_EXPERIMENTS, ids=lambda p: p.stem)
def test_the_dry_run_of_each_paper_experiment_shows_its_recipes_and_costs(path: Path, registries: Registries) -> None:
    """protocol paper; sft, kd and seqkd from the base model, minillm / dpkd / dpkd-token from the SFT init; MiniLLM's
    own schedule and LM term; every cell's steps with and without its ancestors."""
    experiment = load_experiment(path)
    assert experiment.protocol == "paper"
    selection = resolve_selection(experiment, registries, None, None, None)
    plan = build_plan(collect(experiment, registries, selection), experiment, registries, selection, 8).to_json()
    assert plan["protocol_card"]["protocol"] == "paper"
    work = {stage["label"]: stage["work"] for stage in plan["stages"] if stage["kind"] == "train"}
    for label, text in work.items():
        method = label.split("/")[2] if label.count("/") == 3 else "teacher"
        from_init = re.search(r" from (\S+): ", text).group(1).endswith("/init/seed0")
        assert from_init == (method in ("minillm", "dpkd", "dpkd-token")), (label, text)
    minillm = next(text for label, text in work.items() if "/minillm/" in label)
    assert "lr 5e-06" in minillm and "0.95" in minillm and "1 × LM term (0.5·CE + 0.5·word-KD" in minillm
    assert "minillm: 1 × (0.5·CE + 0.5·word-KD) on openwebtext" in plan["protocol_card"]["lm term"]
    cells = {cell["label"].split("/")[2]: cell for cell in plan["cells"]}
    assert cells["minillm"]["optimizer_steps"] <= 5000
    assert cells["minillm"]["optimizer_steps_total"] > cells["minillm"]["optimizer_steps"] + cells["sft"]["optimizer_steps"]


def test_the_protocol_card_states_the_protocol_and_a_mixed_folder_shows_two(registries: Registries) -> None:
    uniform = parse_experiment(tiny(), "t")
    card = protocol_card(uniform, [0, 1, 2])
    assert card["protocol"] == "uniform" and "validation loss" in card["init"]
    assert "best validation rougeL" in card["selection"] and card["training seeds"] == "0, 1, 2"
    text = render_card(card)
    assert text.splitlines()[0] == "protocol: uniform" and "evaluation: test split, sampled" in text
    paper = protocol_card(parse_experiment(tiny(protocol="paper"), "t"), [0])
    assert "base model" in paper["init"]
    final = protocol_card(parse_experiment(tiny(selection={"rule": "final"}), "t"), [0])
    assert final["selection"].startswith("final checkpoint")
    assert cards_of([{"protocol_card": card}, {"protocol_card": card}, {"protocol_card": paper}]) == [card, paper]


TEACHER_EXPERIMENT = """
name: teachers
protocol: uniform
data: {dataset: tiny, options: {n_train: 300, n_validation: 10, n_test: 20}, max_length: 64, max_prompt_length: 48}
models: {scale: tiny, families: [gpt2]}
teacher: {training: {engine: accelerate, lr: 3.0e-3, batch_size: 32, max_steps: 4}}
init: {training: {engine: accelerate, lr: 5.0e-3, batch_size: 32, max_steps: 2}}
training: {engine: accelerate, lr: 5.0e-3, batch_size: 32, max_steps: 2}
selection: {every: 2}
methods: {kd: {}}
evaluation: {seeds: [10], max_new_tokens: 8, batch_size: 20}
"""


@pytest.mark.slow
def test_exported_teachers_are_model_folders_a_run_starts_from(tmp_path: Path) -> None:
    """`kdbench export-teachers` (how the tiny suite's shipped teachers are made, here on a 4-step budget) writes an
    ordinary model folder with its training record; an experiment naming it (relative to the file) trains no
    teacher, keys it by its contents, gives the students its tokenizer and counts its training as an ancestor."""
    import os
    import subprocess
    import sys

    from kdbench.zoo import load_model, load_tokenizer

    (tmp_path / "teachers.yaml").write_text(TEACHER_EXPERIMENT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KDBENCH_CACHE_DIR": str(tmp_path / "cache")}
    kdbench = [sys.executable, "-m", "kdbench"]
    exported = subprocess.run([*kdbench, "export-teachers", "-e", str(tmp_path / "teachers.yaml"), "--out",
                               str(tmp_path / "shipped")], capture_output=True, text=True, env=env, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    folder = tmp_path / "shipped" / "gpt2"
    assert load_model(str(folder)).config.model_type == "gpt2" and len(load_tokenizer(str(folder))) > 300
    assert json.loads((folder / "train_stats.json").read_text())["steps"] == 4

    using = TEACHER_EXPERIMENT.replace("name: teachers", "name: shipped").replace(
        "models: {scale: tiny, families: [gpt2]}", "models: {scale: tiny, families: [gpt2], teachers: {gpt2: shipped/gpt2}}")
    (tmp_path / "shipped.yaml").write_text(using.replace("teacher: {training:", "teacher: {train: false, training:"))
    registries = load_registries()
    experiment = load_experiment(tmp_path / "shipped.yaml")
    graph = collect(experiment, registries, resolve_selection(experiment, registries, None, None, None))
    teacher = next(node for node in graph if node.kind is StageKind.CHECKPOINT)
    assert teacher.inputs["checkpoint"].startswith("local:") and not any(n.kind is StageKind.TOKENIZER for n in graph)
    completed = subprocess.run([*kdbench, "run", "-e", str(tmp_path / "shipped.yaml"), "--out", str(tmp_path / "out")],
                               capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path.parent)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "out/cells/gpt2/s1/kd/seed0/result.json").read_text())
    assert result["cost"]["ancestors"]["gpt2/teacher"]["optimizer_steps"] == 4
    assert result["optimizer_steps_total"] == 4 + 2 + 2


PAPER_RUN = """
name: paper-run
protocol: paper
data: {dataset: tiny, options: {n_train: 300, n_validation: 10, n_test: 20}, max_length: 64,
       max_prompt_length: 48}
models: {scale: tiny, families: [opt]}
teacher: {training: {engine: accelerate, lr: 3.0e-3, batch_size: 32, max_steps: 4}}
init: {training: {engine: accelerate, lr: 5.0e-3, batch_size: 16, max_steps: 3}}
training: {engine: accelerate, lr: 5.0e-3, batch_size: 16, max_steps: 2}
selection: {every: 2}
methods:
  minillm: {kd_ratio: 1.0, rollout_batches: 2, inner_epochs: 2, recompute_logp: true}
  dpkd-token: {kd_ratio: 0.5, train_on: teacher_text, logsoftmax_dtype: bfloat16}
method_training:
  minillm: {betas: [0.9, 0.95], grad_accum: 2, lm_coef: 1.0, lm_kd_ratio: 0.5}
  dpkd-token: {lm_coef: 0.5, lm_kd_ratio: 0.5}
lm_data: {dataset: tiny, options: {corpus_mentions: 500}, max_chunks: 64}
teacher_generations: {max_new_tokens: 12, batch_size: 100}
evaluation: {seeds: [10], max_new_tokens: 12, batch_size: 20}
"""


@pytest.mark.slow
def test_paper_recipes_run_with_their_pre_training_term(tmp_path: Path) -> None:
    """The paper path end to end on CPU: minillm (no gold CE, eval-mode policy, one step per inner epoch) and
    dpkd-token (on the teacher's text) from the SFT init, each with its LM term on the suite's world as prose."""
    import os
    import subprocess
    import sys

    (tmp_path / "paper.yaml").write_text(PAPER_RUN)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KDBENCH_CACHE_DIR": str(tmp_path / "cache")}
    completed = subprocess.run([sys.executable, "-m", "kdbench", "run", "-e", str(tmp_path / "paper.yaml"), "--out",
                                str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Protocol card" in completed.stdout
    for method, micro_batches in (("minillm", 2 * 2), ("dpkd-token", 2)):
        result = json.loads((tmp_path / f"out/cells/opt/s1/{method}/seed0/result.json").read_text())
        assert result["status"] == "ok" and result["protocol"] == "paper"
        assert "minillm: 1 × (0.5·CE + 0.5·word-KD) on tiny" in result["protocol_card"]["lm term"]
        assert result["cost"]["ancestors"]["opt/s1/init/seed0"]["optimizer_steps"] == 3
        # every micro-batch runs the student on its sequences and on a batch of pre-training chunks, and the
        # teacher on those chunks for the word-KD half
        assert result["forward_passes"]["student"] == 2 * micro_batches  # minillm, kd_ratio 1: no gold pass
        assert result["forward_passes"]["teacher"] == 2 * micro_batches
    assert len(list((tmp_path / "cache" / "tokenize").glob("*/lm.json"))) == 1


def test_the_teacher_stage_may_validate_on_its_own_schedule(registries: Registries) -> None:
    """teacher.selection replaces the experiment's selection for the teacher's stage alone (a long teacher run
    validates less often, on fewer prompts); every student stage keeps the experiment's."""
    teacher_selection = {"every": 250, "max_examples": 5}
    nodes = train_nodes(tiny(teacher={"train": True, "selection": teacher_selection}), registries)
    assert {k: nodes["gpt2/teacher"].inputs["selection"][k] for k in teacher_selection} == teacher_selection
    students = [n for label, n in nodes.items() if label != "gpt2/teacher"]
    assert students and all(n.inputs["selection"]["every"] == 50 and n.inputs["selection"]["max_examples"] is None
                            for n in students)
    assert train_nodes(tiny(teacher={"train": True}), registries)["gpt2/teacher"].inputs["selection"]["every"] == 50


def test_the_sft_init_may_validate_on_its_own_schedule(registries: Registries) -> None:
    """init.select_every spaces the SFT init's validation-loss checks alone (a long init validates less often); the
    method stages keep selection.every, and without it the init does too. The protocol card states the init's."""
    init = {"training": {"max_steps": 5, "batch_size": 16}, "select_every": 4}
    nodes = train_nodes(tiny(init=init), registries)
    assert {nodes[f"gpt2/s1/init/seed{seed}"].inputs["selection"]["every"] for seed in (0, 1)} == {4}
    students = [n for label, n in nodes.items() if "/init/" not in label]
    assert students and all(n.inputs["selection"]["every"] == 50 for n in students)
    assert train_nodes(tiny(), registries)["gpt2/s1/init/seed0"].inputs["selection"]["every"] == 50
    card = protocol_card(parse_experiment(tiny(init=init), "t"), [0])
    assert "selected by validation loss every 4 steps" in card["init"]
    assert "every 50 optimizer steps" in card["selection"]
