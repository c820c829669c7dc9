"""``kdbench run --dry-run``'s plan: sizes from configs alone, ZeRO memory, and the stages in run order.

Everything here is offline and loads no weights: paper checkpoints are sized from the families' tables."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from test_grid import with_trained_inits
from transformers import AutoModelForCausalLM, GPT2Config

from kdbench.config import Experiment, load_experiment, parse_experiment
from kdbench.data import TEMPLATE_PIECES
from kdbench.grid.collect import collect
from kdbench.grid.estimate import GIB, estimate_activations, estimate_memory, paper_model_size, tiny_model_size
from kdbench.grid.plan import Plan, PlannedStage, build_plan
from kdbench.grid.plan_table import print_plan
from kdbench.grid.selection import resolve_selection
from kdbench.registry import Registries, load_registries
from kdbench.train.engine import total_optimizer_steps

GPT2_SMALL = 124_439_808
GPT2_XL = 1_557_611_200

# The published sizes; tied input/output embeddings count once.
PUBLISHED = [
    ("gpt2", "gpt2", GPT2_SMALL),
    ("gpt2", "gpt2-medium", 354_823_168),
    ("gpt2", "gpt2-large", 774_030_080),
    ("gpt2", "gpt2-xl", GPT2_XL),
    ("opt", "facebook/opt-1.3b", 1_315_758_080),
    ("opt", "facebook/opt-13b", 12_853_473_280),
]


@pytest.fixture(scope="module")
def registries() -> Registries:
    return load_registries()


def plan_of(experiment: Experiment, registries: Registries, gpus: int, methods: list[str] | None = None) -> Plan:
    selection = resolve_selection(experiment, registries, methods, None, None)
    return build_plan(collect(experiment, registries, selection), experiment, registries, selection, gpus)


# -- sizes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("family", "name", "expected"), PUBLISHED)
def test_paper_checkpoints_have_their_published_sizes(registries: Registries, family: str, name: str,
                                                      expected: int) -> None:
    size = paper_model_size(name, registries.families.get(family))
    assert size.params == expected


def test_every_paper_checkpoint_is_in_its_familys_table(registries: Registries) -> None:
    for name in registries.families:
        family = registries.families.get(name)
        assert {family.paper_teacher, *family.paper_students.values()} <= set(family.paper_configs)


def test_a_local_folder_is_sized_from_its_config_like_the_real_model(registries: Registries, tmp_path: Path) -> None:
    config = GPT2Config(vocab_size=500, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    config.save_pretrained(tmp_path)  # config.json only: no weights anywhere
    size = paper_model_size(str(tmp_path), registries.families.get("gpt2"))
    real = AutoModelForCausalLM.from_config(config)
    assert size.source == "local folder"
    assert size.params == sum(p.numel() for p in real.parameters())  # tied lm_head counted once, as here
    assert (size.hidden, size.layers, size.heads, size.vocab) == (32, 2, 2, 500)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_tiny_models_are_sized_as_the_runner_builds_them(registries: Registries, family: str) -> None:
    data = load_experiment(None).data
    spec = registries.families.get(family)
    for arch in (spec.tiny_teacher, *spec.tiny_students.values()):
        size = tiny_model_size(spec, arch, data)
        vocab = data.tokenizer_vocab_size + len(TEMPLATE_PIECES)
        real = AutoModelForCausalLM.from_config(spec.make_config(arch, vocab, data.max_length, 0, 1))
        assert size.vocab == vocab and size.params == sum(p.numel() for p in real.parameters())


# -- memory ---------------------------------------------------------------------------------------

def test_zero_1_bf16_on_8_gpus_by_hand() -> None:
    memory = estimate_memory(GPT2_SMALL, "bf16", 1, 8)
    assert memory.weights == 248_879_616  # 2Ψ, replicated
    assert memory.gradients == 248_879_616  # 2Ψ, replicated
    assert memory.optimizer == 186_659_712  # 12Ψ / 8
    assert memory.teacher == memory.activations == 0
    assert memory.total == 684_418_944


@pytest.mark.parametrize(("precision", "stage", "expected"), [
    # (weights, gradients, optimizer) bytes of 124,439,808 parameters on 8 GPUs
    ("bf16", 0, (248_879_616, 248_879_616, 1_493_277_696)),
    ("bf16", 2, (248_879_616, 31_109_952, 186_659_712)),
    ("bf16", 3, (31_109_952, 31_109_952, 186_659_712)),
    ("fp16", 1, (248_879_616, 248_879_616, 186_659_712)),
    ("fp32", 0, (497_759_232, 497_759_232, 995_518_464)),
    ("fp32", 1, (497_759_232, 497_759_232, 124_439_808)),
    ("fp32", 2, (497_759_232, 62_219_904, 124_439_808)),
    ("fp32", 3, (62_219_904, 62_219_904, 124_439_808)),
])
def test_every_zero_stage_and_precision_by_hand(precision: str, stage: int, expected: tuple[int, int, int]) -> None:
    memory = estimate_memory(GPT2_SMALL, precision, stage, 8)
    assert (memory.weights, memory.gradients, memory.optimizer) == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_zero_stage_needs_less_than_the_one_before(precision: str) -> None:
    totals = [estimate_memory(GPT2_SMALL, precision, stage, 8, GPT2_XL, 10**9).total for stage in (0, 1, 2, 3)]
    assert totals[3] < totals[2] < totals[1] < totals[0]
    single = {estimate_memory(GPT2_SMALL, precision, stage, 1).total for stage in (0, 1, 2, 3)}
    assert len(single) == 1  # nothing to shard over on one GPU


def test_a_frozen_teacher_adds_its_weights_in_the_training_dtype() -> None:
    assert estimate_memory(GPT2_SMALL, "bf16", 3, 8, GPT2_XL).teacher == 2 * GPT2_XL  # whole on every GPU
    assert estimate_memory(GPT2_SMALL, "fp32", 1, 8, GPT2_XL).teacher == 4 * GPT2_XL


def test_activations_by_hand(registries: Registries) -> None:
    size = paper_model_size("gpt2", registries.families.get("gpt2"))
    s, b, h, a, v, layers = 512, 2, 768, 12, 50257, 12
    output = 4 * s * b * h + 4 * s * b * v
    full = layers * s * b * h * (34 + 5 * a * s // h) + output  # 5·a·s/h = 40 exactly here
    assert estimate_activations(size, b, s, "bf16") == full == 907_350_016
    assert estimate_activations(size, b, s, "bf16", checkpointing=True) == layers * 2 * s * b * h + output
    assert estimate_activations(size, b, s, "bf16", sequences=3) == 3 * full
    assert estimate_activations(size, b, s, "fp32") == 2 * layers * s * b * h * 74 + 8 * s * b * h + 4 * s * b * v
    assert estimate_activations(size, b, s, "bf16", fused_head=True) == full - 4 * s * b * v  # no whole logits kept


# -- the plan -------------------------------------------------------------------------------------

def cell_node(plan: Plan, cell: str) -> Any:
    return next(n for n in plan.graph.cells() if n.label == cell)


def trained(plan: Plan, cell: str) -> PlannedStage:
    """The stage that made the model ``cell`` evaluates."""
    return plan.stage(cell_node(plan, cell).deps["model"])


def lineage_names(plan: Plan, cell: str) -> list[str]:
    """The stage names (``train sft``, ``generate``, …) a cell is built from, in run order."""
    return [plan.stage(key).name for key in plan.graph.lineage(cell_node(plan, cell).key)]


# The objectives whose teacher logits are all on gold sequences: they read the stored outputs (teacher_outputs.share).
TEACHER_FORCED = ("kd", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "abkd", "topk-kd", "dpkd-token")


@pytest.mark.parametrize("gpus", [1, 4])
def test_the_tiny_plan_lists_every_stage_with_the_engines_step_counts(registries: Registries, gpus: int) -> None:
    experiment = load_experiment(None)
    plan = plan_of(experiment, registries, gpus)
    splits = registries.datasets.get("tiny").load(dict(experiment.data.options))
    n_train = len(splits["train"])
    assert plan.train_examples == n_train and not plan.data.estimated
    # per family the shipped teacher, the student's shipped pretrained base and the shipped SFT init of each seed
    assert [(m.family, m.role, m.label) for m in plan.models] == [
        (f, role, label) for f in ("gpt2", "opt")
        for role, label in [("teacher", "teacher"), ("student", "s1/base"),
                            *(("student", f"s1/init/seed{k}") for k in experiment.seeds)]]
    for family in ("gpt2", "opt"):
        teacher, student, *_ = (m for m in plan.models if m.family == family)
        assert teacher.size is not None and student.size is not None  # the shipped folders' sizes from their configs
        assert trained(plan, f"{family}/teacher/teacher/seed0").training is None  # shipped: nothing to train
        for method in experiment.methods:
            cell = f"{family}/s1/{method}/seed0"
            names = lineage_names(plan, cell)
            # what prepares the cell: the shipped SFT init is read, not trained; the teacher's samples are made when
            # the loss reads them, its stored outputs when the loss reads its logits on gold sequences alone
            train = trained(plan, cell)
            preparation = [n for n in names[:-2] if n not in ("checkpoint", "init", "tokenize")]
            expected = {"texts": "generate", "outputs": "teacher_outputs"}
            assert sorted(preparation) == sorted(expected[role] for role in train.node.deps if role in expected)
            assert ("outputs" in train.node.deps) == (method in TEACHER_FORCED), (method, names)
            assert ("texts" in train.node.deps) == (method in ("seqkd", "dpkd")), (method, names)
            assert plan.stage(train.node.deps["init"]).name == "checkpoint"
            assert names[-2:] == [f"train {method}", "eval"] and train.name == f"train {method}"
            assert train.training is not None and train.training.params == student.size.params
            assert train.training.steps == total_optimizer_steps(experiment.training_for(method), n_train, gpus) == 200
            assert not train.training.steps_estimated
            # The teacher stays loaded from its evaluation to the family's last reader: every stage that runs it, and
            # the stages in between; a stage after its last reader does not hold it.
            if "teacher" in train.node.deps:
                assert train.training.teacher_params == teacher.size.params
            else:
                assert train.training.teacher_params in (0, teacher.size.params)
            assert f"{len(splits['test']):,} examples × 5 seeds" in plan.stage(cell_node(plan, cell).key).work
            # the shipped SFT init's recorded 2,000 steps, and the shipped teacher's 3,000 for the rows whose training
            # reads it (its base's pretraining, like a paper checkpoint's, counts for no row)
            assert plan.cell_steps(cell_node(plan, cell)) == (200, 200 + 2000 + (0 if method == "sft" else 3000))


def test_one_sft_init_per_seed_serves_every_method(registries: Registries) -> None:
    plan = plan_of(with_trained_inits(load_experiment(None)), registries, 1, ["minillm", "sft"])
    sft = trained(plan, "gpt2/s1/sft/seed0")
    minillm = trained(plan, "gpt2/s1/minillm/seed0")
    assert minillm.node.deps["init"] == sft.node.deps["init"] == plan.graph.lineage(sft.node.key)[-2]
    assert [s.node.label for s in plan.stages].count("gpt2/s1/init/seed0") == 1  # trained once, read by both
    assert plan.stage(minillm.node.deps["init"]).name == "train sft"
    assert plan.stage(minillm.node.deps["init"]).number < minillm.number


def paper_experiment(data_options: dict[str, Any] | None = None, engine: str = "deepspeed") -> Experiment:
    return parse_experiment({
        "name": "paper-gpt2",
        "protocol": "paper",
        "data": {"dataset": "dolly", "options": data_options or {}, "max_length": 512, "max_prompt_length": 256},
        "models": {"scale": "paper", "families": ["gpt2"], "students": ["120M"]},
        "training": {"engine": engine, "precision": "bf16", "zero_stage": 1, "batch_size": 2, "grad_accum": 1,
                     "epochs": 20, "lr": 5e-4},
        "methods": {"sft": {}, "kd": {}, "seqkd": {}, "dpkd": {}},
        "method_training": {"dpkd": {"epochs": None, "max_steps": 5000}},
    }, "test")


def test_a_paper_plan_runs_offline_with_dollys_documented_size(registries: Registries) -> None:
    experiment = paper_experiment()
    plan = plan_of(experiment, registries, 8)
    assert plan.data.estimated and plan.train_examples == 15_011 - 1_000 - 500 and plan.eval_examples == 500
    teacher, student = plan.models
    assert (teacher.checkpoint, student.checkpoint) == ("gpt2-xl", "gpt2")
    assert teacher.size is not None and teacher.size.params == GPT2_XL
    assert student.size is not None and student.size.params == GPT2_SMALL
    kd = trained(plan, "gpt2/120M/kd/seed0").training
    assert kd is not None and kd.steps_estimated and kd.global_batch == 16
    assert kd.steps == total_optimizer_steps(experiment.training, 13_511, 8) == 16_880
    activations = estimate_activations(student.size, 2, 512, "bf16")
    assert kd.memory == estimate_memory(GPT2_SMALL, "bf16", 1, 8, GPT2_XL, activations)
    dpkd = trained(plan, "gpt2/120M/dpkd/seed0").training
    assert dpkd is not None and dpkd.steps == 5000 and not dpkd.steps_estimated  # max_steps needs no data size

    console = Console(record=True, width=200)
    print_plan(plan, console)
    text = console.export_text()
    assert "≈13,511 training examples" in text and "1,557,611,200" in text and "2 × 1 × 8 = 16" in text
    assert f"{kd.memory.total / GIB:.2f}" in text


def test_plain_accelerate_keeps_fp32_states_on_every_gpu(registries: Registries) -> None:
    plan = plan_of(paper_experiment(engine="accelerate"), registries, 8)
    kd = trained(plan, "gpt2/120M/kd/seed0").training
    assert kd is not None and kd.zero_stage is None and kd.memory is not None
    # autocast: fp32 weights, gradients and Adam moments, replicated by DDP; the teacher in bf16
    assert (kd.memory.weights, kd.memory.gradients, kd.memory.optimizer) == (4 * GPT2_SMALL, 4 * GPT2_SMALL, 8 * GPT2_SMALL)
    assert kd.memory.teacher == 2 * GPT2_XL


def test_a_local_dolly_copy_is_counted_not_estimated(registries: Registries, tmp_path: Path) -> None:
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Q{i}?", "context": "", "response": f"A{i}.",
                                        "category": "open_qa"}) + "\n" for i in range(80)))
    plan = plan_of(paper_experiment({"path": str(path), "n_validation": 10, "n_test": 5}), registries, 2)
    assert plan.train_examples == 65 and plan.eval_examples == 5 and not plan.data.estimated


def test_unknown_data_sizes_are_said_so(registries: Registries, tmp_path: Path) -> None:
    raw = {"name": "missing-data", "protocol": "uniform",
           "data": {"dataset": "jsonl", "options": {"dir": str(tmp_path / "absent")}},
           "models": {"families": ["gpt2"]}, "training": {"epochs": 1}, "methods": {"sft": {}}}
    plan = plan_of(parse_experiment(raw, "test"), registries, 1)
    assert plan.train_examples is None and plan.data.sizes is None and "unknown" in plan.data.how
    assert all(s.training.steps is None for s in plan.training_stages if s.training is not None)
    console = Console(record=True, width=200)
    print_plan(plan, console)
    assert "? training examples" in console.export_text()


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*_from_*.yaml")),
                         ids=lambda p: p.stem)
def test_dry_run_of_every_paper_experiment_prints_a_plan_and_touches_nothing(
        path: Path, tmp_path: Path, subprocess_env: Callable[..., dict[str, str]]) -> None:
    """The command a user runs first: offline, no weights, no cache entries, no results, exit 0."""
    env = subprocess_env(KDBENCH_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200")
    completed = subprocess.run([sys.executable, "-m", "kdbench", "run", "--dry-run", "--gpus", "8", "--experiment",
                                str(path), "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                               timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    for heading in ("models", "stages in run order", "training stages", "memory per GPU"):
        assert heading in completed.stdout, heading
    assert "train sft" in completed.stdout and "train minillm" in completed.stdout
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
