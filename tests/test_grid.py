"""The stage graph from settings alone: keys, dependencies, versions and what a change invalidates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kdbench.config import Experiment, load_experiment
from kdbench.grid import stages
from kdbench.grid.collect import collect
from kdbench.grid.graph import StageGraph, StageKind
from kdbench.grid.selection import resolve_selection
from kdbench.registry import Registries, Registry, load_registries
from kdbench_plugins.kd import KD

SEEDS = load_experiment(None).seeds  # the tiny default's training seeds


@pytest.fixture(scope="module")
def registries() -> Registries:
    return load_registries()


def graph_of(experiment: Experiment, registries: Registries, methods: str = "sft,kd,seqkd,minillm,dpkd") -> StageGraph:
    selection = resolve_selection(experiment, registries, methods.split(","), ["gpt2", "opt"], None)
    return collect(experiment, registries, selection)


def keys_by_label(graph: StageGraph) -> dict[tuple[str, str], str]:
    return {(node.kind.value, node.label): node.key for node in graph}


def with_objective(registries: Registries, objective: type) -> Registries:
    """The same plugins, with ``objective`` in place of the one of its name."""
    objectives: Registry = Registry("objective")
    for name in registries.objectives:
        objectives.add(name, objective if name == objective.name else registries.objectives.get(name), "test")
    return dataclasses.replace(registries, objectives=objectives)


def changed(before: StageGraph, after: StageGraph) -> set[tuple[str, str]]:
    old, new = keys_by_label(before), keys_by_label(after)
    assert old.keys() == new.keys()
    return {label for label in old if old[label] != new[label]}


def with_trained_inits(experiment: Experiment) -> Experiment:
    """The experiment with its SFT inits trained here instead of read from shipped folders."""
    return experiment.model_copy(update={"models": experiment.models.model_copy(update={"sft_inits": {}})})


def from_scratch(experiment: Experiment) -> Experiment:
    """The experiment with its bases, teachers and SFT inits trained here instead of read from shipped folders."""
    experiment = with_trained_inits(experiment)
    return experiment.model_copy(update={"teacher": experiment.teacher.model_copy(update={"train": True}),
                                         "models": experiment.models.model_copy(update={"teachers": {}, "bases": {}})})


def test_collect_builds_the_graph_from_settings_alone(registries: Registries, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    graph = graph_of(from_scratch(load_experiment(None)), registries)
    assert list(tmp_path.iterdir()) == []  # nothing loaded or written
    assert keys_by_label(graph) == keys_by_label(graph_of(from_scratch(load_experiment(None)), registries))  # stable
    order = list(graph.nodes)
    for node in graph:
        assert all(order.index(parent) < order.index(node.key) for parent in node.deps.values())
    # one tokenizer, one packed corpus and one tokenised split of each instruction set (the teacher's, the
    # distillation set) for both families; a base per architecture, a teacher, its SFT and its row per family
    kinds = [node.kind for node in graph]
    assert kinds.count(StageKind.TOKENIZER) == 1 and kinds.count(StageKind.TOKENIZE) == 3
    assert sorted(node.label for node in graph if node.label.endswith("/base")) == [
        f"{f}/{m}/base" for f in ("gpt2", "opt") for m in ("s1", "teacher")]
    assert graph.bases == {node.key for node in graph if node.label.endswith("/base")}
    assert kinds.count(StageKind.GENERATE) == 2  # one per teacher, read by seqkd and dpkd
    seeds = len(load_experiment(None).seeds)
    assert len(graph.cells()) == 2 * (1 + 5 * seeds)
    keys = keys_by_label(graph)
    # uniform: every method, sft included, continues from the one SFT init of its student and seed
    init = keys[("train", "gpt2/s1/init/seed0")]
    for method in ("sft", "kd", "seqkd", "minillm", "dpkd"):
        assert graph[keys[("train", f"gpt2/s1/{method}/seed0")]].deps["init"] == init
    assert graph[init].inputs["selection"]["metric"] == "loss"
    sft = keys[("train", "gpt2/s1/sft/seed0")]
    assert "teacher" not in graph[sft].deps  # sft never reads the teacher, so its cells do not depend on it
    kd = graph[keys[("train", "gpt2/s1/kd/seed0")]]  # it reads the teacher's stored outputs, shared by every seed
    assert graph[kd.deps["outputs"]].deps["teacher"] == keys[("train", "gpt2/teacher")]
    assert set(graph[keys[("train", "gpt2/s1/dpkd/seed0")]].deps) == {"init", "data", "teacher", "texts"}
    lineage = graph.lineage(keys[("eval", "gpt2/s1/sft/seed0")])
    assert [graph[k].label for k in lineage] == ["data", "corpus", "gpt2/s1", "gpt2/s1/base", "data",
                                                 "gpt2/s1/init/seed0", "gpt2/s1/sft/seed0", "gpt2/s1/sft/seed0"]
    # a row's cost counts from its base, as from a paper-scale checkpoint
    assert [graph[k].label for k in graph.costed_lineage(keys[("eval", "gpt2/s1/kd/seed0")])] == [
        "teacher data", "gpt2/teacher", "data", "gpt2/s1/init/seed0", "gpt2/teacher/outputs", "gpt2/s1/kd/seed0",
        "gpt2/s1/kd/seed0"]


def test_shipped_bases_teachers_and_sft_inits_are_checkpoints_whose_tokenizer_the_students_share(
        registries: Registries) -> None:
    """The default reads each family's teacher from experiments/teachers/<family> and each training seed's SFT init
    from experiments/inits/<family>/s1/seed<k>: no base, teacher, tokenizer or init training. With the inits trained
    here they start from the shipped student bases (experiments/bases/<family>/s1), one for every seed, which are
    bases: no row's cost counts them."""
    experiment = load_experiment(None)
    graph = graph_of(experiment, registries)
    checkpoints = {node.label: node for node in graph if node.kind is StageKind.CHECKPOINT}
    # the students' bases are read for their tokenizer alone (each model folder tokenises its own data)
    assert sorted(checkpoints) == sorted([f"{f}/teacher" for f in ("gpt2", "opt")]
                                         + [f"{f}/s1/base" for f in ("gpt2", "opt")]
                                         + [f"{f}/s1/init/seed{k}" for f in ("gpt2", "opt") for k in SEEDS])
    assert graph.bases == {checkpoints[f"{f}/s1/base"].key for f in ("gpt2", "opt")}
    assert all(set(node.deps) == {"tokenizer"} for node in graph if node.kind is StageKind.TOKENIZE)
    for node in checkpoints.values():
        assert node.inputs["checkpoint"].startswith("local:") and Path(node.spec.path).is_dir()
    assert not any(node.kind in (StageKind.TOKENIZER, StageKind.INIT) for node in graph)
    assert not any(node.kind is StageKind.TRAIN and (node.label.endswith(("/teacher", "/base")) or "/init/" in node.label)
                   for node in graph)
    trained_inits = graph_of(with_trained_inits(experiment), registries)
    bases = {node.label: node for node in trained_inits if node.kind is StageKind.CHECKPOINT and node.key in
             trained_inits.bases}
    assert sorted(bases) == ["gpt2/s1/base", "opt/s1/base"]
    for node in trained_inits:
        if node.kind is StageKind.TRAIN and "/init/" in node.label:
            assert node.deps["init"] == bases[f"{node.family}/s1/base"].key


def test_bumping_an_objectives_version_rekeys_exactly_its_cells(registries: Registries) -> None:
    experiment = load_experiment(None)
    before = graph_of(experiment, registries)

    class KDFixed(KD):
        version = KD.version + 1

    after = graph_of(experiment, with_objective(registries, KDFixed))
    assert changed(before, after) == {(kind, f"{f}/s1/kd/seed{k}") for kind in ("train", "eval") for f in ("gpt2", "opt")
                                      for k in SEEDS}


def test_bumping_a_sources_version_rekeys_the_stages_that_read_it(registries: Registries) -> None:
    from kdbench_plugins.sources import TeacherText

    class TeacherTextFixed(TeacherText):
        version = TeacherText.version + 1

    sources: Registry = Registry("sequence source")
    for name in registries.sources:
        sources.add(name, TeacherTextFixed if name == "teacher_text" else registries.sources.get(name), "test")
    experiment = load_experiment(None)
    after = graph_of(experiment, dataclasses.replace(registries, sources=sources))
    assert changed(graph_of(experiment, registries), after) == {
        (kind, f"{f}/s1/{m}/seed{k}") for kind in ("train", "eval") for f in ("gpt2", "opt") for m in ("seqkd", "dpkd")
        for k in SEEDS}


def test_bumping_a_stage_builder_rekeys_that_kind_and_everything_downstream(registries: Registries,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = load_experiment(None)
    before = graph_of(experiment, registries)
    builder = stages.BUILDERS[StageKind.GENERATE]
    monkeypatch.setitem(stages.BUILDERS, StageKind.GENERATE, dataclasses.replace(builder, version=builder.version + 1))
    after = graph_of(experiment, registries)
    assert changed(before, after) == {("generate", f"{f}/teacher") for f in ("gpt2", "opt")} | {
        (kind, f"{f}/s1/{m}/seed{k}") for kind in ("train", "eval") for f in ("gpt2", "opt") for m in ("seqkd", "dpkd")
        for k in SEEDS}


def test_a_new_dataset_version_rekeys_every_stage_built_on_the_data(registries: Registries) -> None:
    """A data generator that changes what the same options give bumps its version; nothing built on the old records
    is reused (shipped teachers are keyed by their files, and a student's random initialisation reads no data)."""
    experiment = load_experiment(None)
    before = graph_of(experiment, registries)
    datasets: Registry = Registry("dataset")
    for name in registries.datasets:
        spec = registries.datasets.get(name)
        datasets.add(name, dataclasses.replace(spec, version=spec.version + 1) if name == "tiny" else spec, "test")
    after = graph_of(experiment, dataclasses.replace(registries, datasets=datasets))
    assert changed(before, after) == {(node.kind.value, node.label) for node in before
                                      if node.kind not in (StageKind.CHECKPOINT, StageKind.INIT)}


def test_a_methods_own_setting_rekeys_only_its_cells(registries: Registries) -> None:
    experiment = load_experiment(None)
    tuned = experiment.model_copy(update={"method_training": {"kd": {"lr": 1e-3}}})
    assert changed(graph_of(experiment, registries), graph_of(tuned, registries)) == {
        (kind, f"{f}/s1/kd/seed{k}") for kind in ("train", "eval") for f in ("gpt2", "opt") for k in SEEDS}
    # the teacher's settings reach its own row and every cell whose training reads the teacher, but not sft's
    experiment = from_scratch(experiment)
    teacher = experiment.teacher.model_copy(update={"training": experiment.teacher_training.model_copy(update={"lr": 1e-3})})
    moved = changed(graph_of(experiment, registries), graph_of(experiment.model_copy(update={"teacher": teacher}),
                                                              registries))
    cells = {label for kind, label in moved if kind == "eval"}
    assert cells == {f"{f}/{c}" for f in ("gpt2", "opt")
                     for c in ("teacher/teacher/seed0", *(f"s1/{m}/seed{k}" for m in ("kd", "seqkd", "minillm", "dpkd")
                                                           for k in SEEDS))}


def test_seeds_share_a_pretrained_base_and_without_pretraining_start_from_their_own_initialisation(
        registries: Registries) -> None:
    """With pretraining every training seed's SFT init starts from the student's one base (as every seed of a paper
    starts from GPT-2 base), and seeds vary the data order; without it a tiny student is initialised with the
    training seed, so seeds vary the initialisation as well."""
    experiment = from_scratch(load_experiment(None))  # the SFT inits trained here, from the students' bases
    selection = resolve_selection(experiment, registries, ["sft", "kd"], ["gpt2"], 3)
    graph = collect(experiment, registries, selection)
    inits = [graph[graph[cell.deps["model"]].deps["init"]] for cell in graph.cells() if cell.spec.kind == "student"]
    assert len({node.key for node in inits}) == 3 and len({node.deps["init"] for node in inits}) == 1
    assert {graph.start_of(node.key).spec.seed for node in inits} == {experiment.pretrain.seed}
    unpretrained = experiment.model_copy(update={"pretrain": None})
    graph = collect(unpretrained, registries, selection)
    for method in ("sft", "kd"):
        starts = [graph.start_of(cell.deps["model"]) for cell in graph.cells() if cell.spec.method == method]
        assert [node.spec.seed for node in starts] == [0, 1, 2] and len({node.key for node in starts}) == 3
        assert all(node.kind is StageKind.INIT for node in starts)
    one_seed = collect(unpretrained, registries, resolve_selection(unpretrained, registries, ["sft", "kd"], ["gpt2"], 1))
    assert {n.key for n in one_seed} <= {n.key for n in graph}  # seed 0 keeps its stages whatever the seed count
    paper = unpretrained.model_copy(update={"models": experiment.models.model_copy(
        update={"scale": "paper", "students": ["120M"], "teachers": {}})})
    graph = collect(paper, registries, resolve_selection(paper, registries, ["sft"], ["gpt2"], 3))
    assert len({graph.start_of(cell.deps["model"]).key for cell in graph.cells() if cell.spec.kind == "student"}) == 1


def test_shared_teacher_outputs_stand_in_for_the_teacher_in_teacher_forced_stages(registries: Registries) -> None:
    """With ``teacher_outputs.share`` one outputs stage per family serves every teacher-forced stage (all seeds);
    stages that sample the teacher or the student keep the teacher; off, the graph is the one without the option."""
    shared = load_experiment(None)  # the tiny suite shares them
    methods = "sft,kd,rkl,seqkd,minillm,dpkd"
    assert shared.teacher_outputs.share and shared.teacher_outputs.top_k is None
    experiment = shared.model_copy(update={"teacher_outputs": shared.teacher_outputs.model_copy(update={"share": False})})
    shared = shared.model_copy(update={"teacher_outputs": shared.teacher_outputs.model_copy(update={"top_k": 16})})
    before, graph = graph_of(experiment, registries, methods), graph_of(shared, registries, methods)
    assert not [node for node in before if node.kind is StageKind.TEACHER_OUTPUTS]
    outputs = {node.family: node for node in graph if node.kind is StageKind.TEACHER_OUTPUTS}
    assert set(outputs) == {"gpt2", "opt"} and len([n for n in graph if n.kind is StageKind.TEACHER_OUTPUTS]) == 2
    keys, unshared = keys_by_label(graph), keys_by_label(before)
    for family, node in outputs.items():
        assert node.label == f"{family}/teacher/outputs" and node.inputs["top_k"] == 16
        assert set(node.deps) == {"teacher", "data"}
        for seed in SEEDS:
            for method in ("kd", "rkl"):
                stage = graph[keys[("train", f"{family}/s1/{method}/seed{seed}")]]
                assert stage.deps["outputs"] == node.key and "teacher" not in stage.deps
            for method in ("sft", "seqkd", "minillm", "dpkd"):  # no teacher logits on gold alone: unchanged
                label = ("train", f"{family}/s1/{method}/seed{seed}")
                assert keys[label] == unshared[label]
    # k is in the key; training stages that do not read the outputs keep their keys
    other_k = shared.model_copy(update={"teacher_outputs": shared.teacher_outputs.model_copy(update={"top_k": 8})})
    moved = changed(graph, graph_of(other_k, registries, methods))
    assert {label for kind, label in moved if kind == "train"} == {
        f"{f}/s1/{m}/seed{k}" for f in ("gpt2", "opt") for m in ("kd", "rkl") for k in SEEDS}


def test_an_init_that_keeps_its_final_checkpoint(registries: Registries) -> None:
    """``init.rule: final`` (the tiny suite's) trains the init to its end and keeps the last checkpoint, its loss
    curve still recorded; ``best`` keeps the lowest validation loss. Only the inits' keys (and what is built on them)
    move, and the protocol card says which."""
    from kdbench.report.card import protocol_card

    final = with_trained_inits(load_experiment(None))
    assert final.init.rule == "final"
    best = final.model_copy(update={"init": final.init.model_copy(update={"rule": "best"})})
    graphs = {rule: graph_of(experiment, registries, "sft,kd") for rule, experiment in (("final", final), ("best", best))}
    for rule, graph in graphs.items():
        inits = [node for node in graph if "/init/" in node.label]
        assert inits and all(node.inputs["selection"] == {**node.inputs["selection"], "metric": "loss",
                                                          "keep_best": rule == "best"} for node in inits)
    assert {label for _, label in changed(graphs["final"], graphs["best"])} == {
        label for kind, label in keys_by_label(graphs["final"]) if "/init/" in label or "/seed" in label and "/s1/" in label}
    assert "its final checkpoint (validation loss recorded every 100 steps)" in protocol_card(final, [0])["init"]
    assert "selected by validation loss every 100 steps" in protocol_card(best, [0])["init"]
