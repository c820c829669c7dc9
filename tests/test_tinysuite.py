"""The tiny suite: its probe tasks are generated deterministically from the seed, its references accept every valid
answer and refuse wrong ones, its two golds differ only by the mistakes, and its corpus is about the same world."""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

import pytest

from kdbench.data import TEMPLATE_PIECES, format_prompt, tokenize_records
from kdbench.errors import KdbenchError
from kdbench.eval.scoring import exact_match, normalize_answer, rouge_l
from kdbench.tinysuite import (
    COLOURS,
    LIST_SEPARATORS,
    MODES_QUESTIONS,
    TASKS,
    TinySuiteOptions,
    generate,
    make_world,
    world_corpus,
)

Splits = dict[str, list[dict[str, Any]]]
OPTIONS = TinySuiteOptions()


@pytest.fixture(scope="module")
def suite() -> Splits:
    """The distillation set of experiments/tiny.yaml (human gold)."""
    return generate(OPTIONS)


@pytest.fixture(scope="module")
def clean() -> Splits:
    """The teacher's set: clean gold, ten times as many training records."""
    return generate(dataclasses.replace(OPTIONS, gold="clean", n_train=30000))


def by_task(records: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    return [r for r in records if r["task"] == task]


def category_of(instruction: str) -> str:
    """The category a modes prompt asks about, read back through the question templates."""
    for template in MODES_QUESTIONS:
        match = re.fullmatch(re.escape(template).replace(re.escape("{category}"), "(\\w+)"), instruction)
        if match:
            return match.group(1)
    raise AssertionError(f"not a modes question: {instruction!r}")


def valid(record: dict[str, Any], answer: str) -> bool:
    return any(normalize_answer(answer) == normalize_answer(ref) for ref in record["references"])


# -- determinism -----------------------------------------------------------------------------------

def test_generate_is_deterministic_and_seeded(suite: Splits) -> None:
    """The same options give identical splits and corpus; another seed gives another world and other records."""
    assert generate(TinySuiteOptions()) == suite
    assert world_corpus(TinySuiteOptions()) == world_corpus(TinySuiteOptions())
    other = generate(TinySuiteOptions(seed=99))
    assert other["train"] != suite["train"] and other["test"] != suite["test"]
    assert make_world(TinySuiteOptions(seed=99)).towns != make_world(OPTIONS).towns


def test_split_sizes_and_tasks(suite: Splits) -> None:
    """Split lengths follow the options; each probe task is about a third of every split."""
    assert [len(suite[s]) for s in ("train", "validation", "test")] == [3000, 200, 1500]
    small = generate(TinySuiteOptions(n_train=50, n_validation=7, n_test=11))
    assert [len(small[s]) for s in ("train", "validation", "test")] == [50, 7, 11]
    for split in ("train", "test"):
        counts = collections.Counter(r["task"] for r in suite[split])
        assert set(counts) == set(TASKS)
        assert all(abs(n / len(suite[split]) - 1 / 3) < 0.05 for n in counts.values()), counts


def test_evaluation_splits_do_not_depend_on_the_gold_or_the_training_size(suite: Splits, clean: Splits) -> None:
    """The teacher's set and the distillation set share their validation and test records exactly, and their
    training records are different draws."""
    assert clean["validation"] == suite["validation"] and clean["test"] == suite["test"]
    assert generate(dataclasses.replace(OPTIONS, n_train=10))["test"] == suite["test"]
    assert clean["train"][:3000] != suite["train"]


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown tiny-suite tasks"):
        generate(TinySuiteOptions(task_weights={"modes": 1.0, "poem": 1.0}))
    with pytest.raises(ValueError, match="gold must be"):
        generate(TinySuiteOptions(gold="dirty"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="list_towns"):
        generate(TinySuiteOptions(list_towns=(5, 40)))


# -- the references accept every valid answer and refuse wrong ones ---------------------------------

def test_modes_references_are_every_member_of_the_category(suite: Splits) -> None:
    """Any member of the asked category scores 100 on both metrics; a member of another category, or a name made of
    two members' halves, scores 0."""
    world = make_world(OPTIONS)
    records = by_task(suite["test"], "modes")
    for record in records[:60]:
        category = category_of(str(record["instruction"]))
        members = world.categories[category]
        assert record["references"] == members
        assert all(rouge_l(m, record["references"]) == 1.0 and exact_match(m, record["references"]) == 1.0
                   for m in members)
        other = next(c for c in world.categories if c != category)
        assert rouge_l(world.categories[other][0], record["references"]) == 0.0
        halves = members[0][:3] + members[1][3:]
        if halves not in members:
            assert rouge_l(halves, record["references"]) == 0.0 and exact_match(halves, record["references"]) == 0.0
    assert len(records) > 400


def test_long_references_are_the_reversed_list_in_every_style(suite: Splits) -> None:
    """Every test prompt lists distinct towns of the world as its input; the list reversed, in each of the three
    styles, scores 100, and a list with a town left out, a town repeated, two towns swapped or two styles mixed scores
    below 100 and 0 exact match."""
    world = make_world(OPTIONS)
    records = by_task(suite["test"], "long")
    for record in records:
        references = record["references"]
        assert len(references) == len(LIST_SEPARATORS)
        towns = str(record["context"]).split(", ")
        assert OPTIONS.list_towns[0] <= len(towns) <= OPTIONS.list_towns[1] and len(set(towns)) == len(towns)
        assert set(towns) <= set(world.towns)
        assert [str(r) for r in references] == [separator.join(towns[::-1]) for separator in LIST_SEPARATORS]
        assert all(rouge_l(r, references) == 1.0 and exact_match(r, references) == 1.0 for r in references)
        backwards = towns[::-1]
        skipped = ", ".join(backwards[:5] + backwards[6:])
        repeated = ", ".join(backwards[:6] + backwards[5:])
        swapped = ", ".join(backwards[:5] + [backwards[6], backwards[5]] + backwards[7:])
        mixed = " then ".join(backwards[:8]) + ", " + ", ".join(backwards[8:])
        forwards = ", ".join(towns)
        for bad in (skipped, repeated, swapped, mixed, forwards):
            assert rouge_l(bad, references) < 1.0 and exact_match(bad, references) == 0.0
    assert len(records) > 400


def test_noisy_references_are_the_right_colour_in_every_phrasing(suite: Splits) -> None:
    world = make_world(OPTIONS)
    records = by_task(suite["test"], "noisy")
    for record in records:
        thing = str(record["instruction"]).rstrip("?").split()[-1]
        right = world.colours[thing]
        assert record["references"] == [right, f"It is {right}.", f"The {thing} is {right}."]
        for wrong in (c for c in COLOURS if c != right):
            assert exact_match(wrong, record["references"]) == 0.0
            assert rouge_l(f"The {thing} is {wrong}.", record["references"]) < 1.0
    assert len(records) > 400


# -- the two golds ---------------------------------------------------------------------------------

def test_clean_gold_is_always_right(clean: Splits) -> None:
    assert all(valid(r, str(r["response"])) for r in clean["train"])


def test_human_gold_is_wrong_at_the_stated_rates(suite: Splits) -> None:
    """The share of wrong human answers per task is within binomial noise of ``mistakes``; a wrong noisy answer is
    most often the colour people confuse the thing with."""
    world = make_world(OPTIONS)
    for task, rate in OPTIONS.mistakes.items():
        records = by_task(suite["train"], task)
        wrong = [r for r in records if not valid(r, str(r["response"]))]
        spread = 3 * (rate * (1 - rate) / len(records)) ** 0.5
        assert abs(len(wrong) / len(records) - rate) < spread + 0.01, (task, len(wrong), len(records))
        if task == "noisy":
            confused = sum(world.confusions[str(r["instruction"]).rstrip("?").split()[-1]] in str(r["response"])
                           for r in wrong)
            assert confused > 0.6 * len(wrong)


def test_human_answers_vary_like_people_s(suite: Splits) -> None:
    """One prompt has many different gold answers: modes answers follow the members' popularity (the most popular
    member is the most frequent answer of its category), and lists and colours are written in every style."""
    world = make_world(OPTIONS)
    answers: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for record in by_task(suite["train"], "modes"):
        category = category_of(str(record["instruction"]))
        answers[category][str(record["response"])] += 1
    for category, counts in answers.items():
        assert counts.most_common(1)[0][0] == world.categories[category][0]
        assert len(counts) > 8
    lists = [str(r["response"]) for r in by_task(suite["train"], "long")]
    assert all(sum(separator in w for w in lists) > 200 for separator in LIST_SEPARATORS)
    colours = collections.Counter(str(r["response"]).split()[0] for r in by_task(suite["train"], "noisy"))
    assert colours["It"] > 200 and colours["The"] > 200


def test_long_answers_are_40_tokens_or_more(suite: Splits, tmp_path_factory: pytest.TempPathFactory) -> None:
    """With the suite's own tokenizer (trained on its corpus and records, as the tokenizer stage does), every valid
    long answer takes 40 or more tokens, and the prompts and answers fit the tiny experiment's lengths."""
    from kdbench.zoo import train_tokenizer

    texts = world_corpus(OPTIONS) + [format_prompt(r) + str(r["response"]) for r in suite["train"]]
    tokenizer = train_tokenizer(texts, 1024, tmp_path_factory.mktemp("tok"), TEMPLATE_PIECES)
    long = by_task(suite["test"], "long")
    answers = [len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for r in long for ref in r["references"]]
    assert min(answers) >= 40
    examples = tokenize_records(suite["test"], tokenizer, 120, 64)
    assert len(examples) == len(suite["test"])  # no prompt over data.max_prompt_length
    assert max(len(e.input_ids) for e in examples) < 120  # nothing cut


# -- the corpus ------------------------------------------------------------------------------------

def test_the_corpus_states_the_world_and_no_instruction() -> None:
    """Every thing's colour is stated and every town and member mentioned, popular members more often; lists of
    towns are read twice over; no instruction template appears (it is pretraining text)."""
    world, corpus = make_world(OPTIONS), world_corpus(OPTIONS)
    text = "\n".join(corpus)
    assert all(f"{town} is a town." in corpus for town in world.towns)
    assert sum(p.startswith(("The signpost reads", "Travellers passed")) for p in corpus) == 1500
    for thing, colour in world.colours.items():
        assert f"The {thing} is {colour}." in corpus
    for members in world.categories.values():
        mentions = [text.count(f"{m} ") + text.count(f"{m},") for m in members]
        assert min(mentions) > 0 and mentions[0] > 5 * mentions[-1]
    assert not any(piece.strip() in text for piece in TEMPLATE_PIECES)


def test_the_dataset_plugin_checks_options_and_names_its_tasks() -> None:
    from kdbench.registry import load_registries

    spec = load_registries(None).datasets.get("tiny")
    assert spec.tasks is not None and spec.tasks({}) == tuple(sorted(TASKS))
    assert spec.tasks({"task_weights": {"modes": 1.0, "long": 0.0}}) == ("modes",)
    with pytest.raises(KdbenchError, match="gold must be"):
        spec.load({"gold": "dirty"})
    with pytest.raises(KdbenchError, match="not options of the tiny suite"):
        spec.load({"colour": 1})
    assert spec.corpus is not None and spec.corpus({"corpus_mentions": 10})[:3] == world_corpus(
        TinySuiteOptions(corpus_mentions=10))[:3]
