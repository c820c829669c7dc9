"""The tiny suite: a miniature of the regime the distillation papers study, deterministic and CPU-sized.

At paper scale a GPT-2 base pretrained on WebText is distilled from a larger teacher that generalises better
than Dolly, the small, human-written instruction set it is distilled on; responses are long and sampled at
temperature 1. The suite builds the same shape from one invented world (experiments/tiny.md states the regime
and the predictions it was built to test):

* ``world_corpus``: plain prose about the world, the stand-in for WebText that every tiny model is pretrained on
  before it sees an instruction;
* instruction records in Dolly's schema, in two kinds of gold: ``gold="clean"`` for the teacher's large
  instruction set (every answer right), ``gold="human"`` for the small distillation set (some answers are
  wrong). In both, answers vary from record to record as people's do (any member of a category, any of three
  ways to write a list or a colour);
* evaluation splits whose ``references`` list every valid answer, so a sampled answer is scored against all of
  them; they are the same whichever gold and however many training records are asked for.

Three probe tasks, each built so that one published mechanism has something to act on:

* ``modes``: "Name a kind of bird." Each category has many members of unequal popularity (Zipf), most of them
  written in several tokens; any member is right. A student too small to hold every member of every category
  cannot cover every mode, so whether it spreads its mass over them (mean-seeking) or keeps to the ones it can
  name (mode-seeking) decides how often a sample is a real member.
* ``long``: "List these towns in reverse order." with 21 to 24 towns as its input. The answer names them from the
  last to the first (40 and more tokens) in one of three styles kept to the end. Which town comes next depends on
  the one just written (where it stands in the input), so one slip — a town misspelt, skipped or repeated — leaves
  the student in a state the gold never showed it, from which it must find its place again.
* ``noisy``: "What colour is the kettle?" A small fixed table the student can learn; the human gold gives a
  wrong colour (most often the one people confuse it with) for a share of records, the clean gold never does.

Everything derives from one integer seed: the same options give byte-identical splits and corpus.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

TASKS = ("modes", "long", "noisy")

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kl", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "", "n", "r", "l", "s", "k", "m", "th"]

CATEGORY_NAMES = ["bird", "stone", "song", "tree", "boat", "spice", "star", "mask", "coin", "flower", "cloak", "lamp",
                  "drum", "fish", "bread", "dance"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
THINGS = ["kettle", "lantern", "saddle", "barrel", "ribbon", "candle", "basket", "helmet", "anchor", "bucket", "mirror",
          "ladder", "blanket", "bottle", "button", "carpet", "cushion", "hammer", "jacket", "pillow", "shovel", "teapot",
          "wagon", "whistle", "apron", "bellows", "chisel", "goblet"]

MODES_QUESTIONS = ["Name a kind of {category}.", "Give one kind of {category}.", "Which {category} can you name?"]
LONG_QUESTIONS = ["List these towns in reverse order.", "Name these towns from the last to the first."]
NOISY_QUESTIONS = ["What colour is the {thing}?", "Which colour is the {thing}?"]
# A list written in one style from its first separator to its last: "A, B, C", "A then B then C", "A to B to C".
LIST_SEPARATORS = (", ", " then ", " to ")
# What colour a thing is: the bare colour, or one of two sentences.
COLOUR_ANSWERS = ("{colour}", "It is {colour}.", "The {thing} is {colour}.")


@dataclass(frozen=True)
class TinySuiteOptions:
    """Size knobs of the suite. The defaults are the distillation set of experiments/tiny.yaml; its teacher's
    set is ``gold="clean"`` with a larger ``n_train``."""

    seed: int = 1234
    n_categories: int = 12
    members_per_category: int = 24
    popularity_exponent: float = 1.0  # member of popularity rank r is drawn with weight 1 / r**exponent
    n_towns: int = 32
    list_towns: tuple[int, int] = (21, 24)  # towns in a long prompt's list (40+ tokens reversed)
    n_things: int = 24
    n_train: int = 3000
    n_validation: int = 200
    n_test: int = 1500
    gold: Literal["human", "clean"] = "human"
    # Share of human-gold records whose answer is wrong, per task (clean gold: none).
    mistakes: dict[str, float] = field(default_factory=lambda: {"modes": 0.05, "long": 0.05, "noisy": 0.3})
    task_weights: dict[str, float] = field(default_factory=lambda: {"modes": 1.0, "long": 1.0, "noisy": 1.0})
    corpus_mentions: int = 24000  # category-member sentences in the pretraining corpus, drawn by popularity

    def check(self) -> list[str]:
        """Problems with the values, one message each; empty when valid."""
        problems = []
        unknown = sorted(set(self.task_weights) - set(TASKS)) + sorted(set(self.mistakes) - set(TASKS))
        if unknown:
            problems.append(f"unknown tiny-suite tasks {unknown}; expected some of {', '.join(TASKS)}")
        if not any(weight > 0 for weight in self.task_weights.values()):
            problems.append(f"task_weights {self.task_weights} give no task a positive weight")
        if self.gold not in ("human", "clean"):
            problems.append(f"gold must be 'human' or 'clean', got {self.gold!r}")
        if not all(0.0 <= rate <= 1.0 for rate in self.mistakes.values()):
            problems.append(f"mistakes must be shares in [0, 1], got {self.mistakes}")
        if not 2 <= self.n_categories <= len(CATEGORY_NAMES):
            problems.append(f"n_categories must be in [2, {len(CATEGORY_NAMES)}], got {self.n_categories}")
        if not 2 <= self.n_things <= len(THINGS):
            problems.append(f"n_things must be in [2, {len(THINGS)}], got {self.n_things}")
        low, high = self.list_towns
        if not 3 <= low <= high <= self.n_towns:
            problems.append(f"list_towns {self.list_towns} must satisfy 3 <= low <= high <= n_towns ({self.n_towns})")
        if self.members_per_category < 2:
            problems.append(f"members_per_category must be at least 2, got {self.members_per_category}")
        return problems


@dataclass(frozen=True)
class World:
    """Everything the records and the corpus talk about."""

    categories: dict[str, list[str]]  # category → members, most popular first
    popularity: list[float]  # weight of the member at each rank (the same for every category)
    towns: list[str]
    colours: dict[str, str]  # thing → its colour
    confusions: dict[str, str]  # thing → the colour people mistake it for


def _pseudo_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _unique_words(rng: random.Random, count: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        word = _pseudo_word(rng, rng.randint(*syllables)).capitalize()
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def make_world(options: TinySuiteOptions) -> World:
    rng = random.Random(options.seed)
    taken: set[str] = set()
    categories = {name: _unique_words(rng, options.members_per_category, (2, 3), taken)
                  for name in CATEGORY_NAMES[:options.n_categories]}
    towns = _unique_words(rng, options.n_towns, (2, 2), taken)
    things = THINGS[:options.n_things]
    colours = {thing: rng.choice(COLOURS) for thing in things}
    confusions = {thing: rng.choice([c for c in COLOURS if c != colours[thing]]) for thing in things}
    popularity = [1.0 / rank ** options.popularity_exponent for rank in range(1, options.members_per_category + 1)]
    return World(categories, popularity, towns, colours, confusions)


def _record(task: str, instruction: str, response: str, references: Sequence[str], context: str = ""
            ) -> dict[str, object]:
    return {"task": task, "instruction": instruction, "context": context, "response": response,
            "references": list(dict.fromkeys(references))}


def _modes(world: World, rng: random.Random, wrong: bool) -> dict[str, object]:
    category = rng.choice(sorted(world.categories))
    members = world.categories[category]
    question = rng.choice(MODES_QUESTIONS).format(category=category)
    if wrong:  # a member of another category
        other = rng.choice([c for c in sorted(world.categories) if c != category])
        answer = rng.choices(world.categories[other], world.popularity)[0]
    else:
        answer = rng.choices(members, world.popularity)[0]
    return _record("modes", question, answer, members)


def _long(world: World, rng: random.Random, low: int, high: int, wrong: bool) -> dict[str, object]:
    towns = rng.sample(world.towns, rng.randint(low, high))
    question = rng.choice(LONG_QUESTIONS)
    backwards = towns[::-1]
    written = [separator.join(backwards) for separator in LIST_SEPARATORS]
    separator = rng.choice(LIST_SEPARATORS)
    if wrong:  # a town left out somewhere between the two ends
        skipped = rng.randrange(1, len(backwards) - 1)
        backwards = backwards[:skipped] + backwards[skipped + 1:]
    return _record("long", question, separator.join(backwards), written, context=", ".join(towns))


def _noisy(world: World, rng: random.Random, wrong: bool) -> dict[str, object]:
    thing = rng.choice(sorted(world.colours))
    question = rng.choice(NOISY_QUESTIONS).format(thing=thing)
    right = [form.format(colour=world.colours[thing], thing=thing) for form in COLOUR_ANSWERS]
    form = rng.choice(COLOUR_ANSWERS)
    colour = world.colours[thing]
    if wrong:  # most often the colour people confuse it with, else any other
        colour = world.confusions[thing] if rng.random() < 0.7 else rng.choice(
            [c for c in COLOURS if c != world.colours[thing]])
    return _record("noisy", question, form.format(colour=colour, thing=thing), right)


def _draw(options: TinySuiteOptions, world: World, rng: random.Random, n: int, gold: str) -> list[dict[str, object]]:
    """``n`` records with ``gold`` responses; every record's references are all the valid answers."""
    tasks = [task for task in TASKS if options.task_weights.get(task, 0) > 0]
    weights = [options.task_weights[task] for task in tasks]
    records = []
    for _ in range(n):
        task = rng.choices(tasks, weights)[0]
        wrong = gold == "human" and rng.random() < options.mistakes.get(task, 0.0)
        if task == "modes":
            records.append(_modes(world, rng, wrong))
        elif task == "long":
            records.append(_long(world, rng, *options.list_towns, wrong))
        else:
            records.append(_noisy(world, rng, wrong))
    return records


def generate(options: TinySuiteOptions) -> dict[str, list[dict[str, object]]]:
    """Return ``{"train", "validation", "test"}`` lists of records, deterministic in ``options``. The evaluation
    splits come from their own random stream, so they are the same for either gold and any ``n_train``."""
    problems = options.check()
    if problems:
        raise ValueError("; ".join(problems))
    world = make_world(options)
    held_out = random.Random(options.seed + 1)
    # Evaluation records carry a clean answer as their response (what a validation loss is taken on), drawn as the
    # teacher's gold is; they are scored against every valid answer.
    validation = _draw(options, world, held_out, options.n_validation, "clean")
    test = _draw(options, world, held_out, options.n_test, "clean")
    train = _draw(options, world, random.Random(f"{options.seed}/{options.gold}"), options.n_train, options.gold)
    return {"train": train, "validation": validation, "test": test}


def tiny_tasks(options: TinySuiteOptions) -> tuple[str, ...]:
    """The task labels the suite's records carry with these options (those of positive weight), sorted."""
    return tuple(sorted(task for task, weight in options.task_weights.items() if weight > 0))


def world_corpus(options: TinySuiteOptions) -> list[str]:
    """Plain prose about the suite's world, the tiny stand-in for WebText: what every tiny model is pretrained on,
    and the text of the pre-training LM term. Members are mentioned as often as they are popular; each thing's colour
    is stated many times; lists of towns are read twice over (text in which a model learns to find its place in a
    list). No instruction template appears in it. The same ``seed`` gives the same world as ``generate``."""
    world = make_world(options)
    rng = random.Random(options.seed + 2)
    paragraphs: list[str] = []
    sentences = ["{member} is a kind of {category}.", "The {category} called {member} is well known.",
                 "People speak of {member}, a {category}.", "Of all the kinds of {category}, {member} is one."]
    categories = sorted(world.categories)
    for _ in range(options.corpus_mentions):
        category = rng.choice(categories)
        member = rng.choices(world.categories[category], world.popularity)[0]
        paragraphs.append(rng.choice(sentences).format(member=member, category=category))
    high = options.list_towns[1]
    for _ in range(1500):  # lists read twice: text in which a model learns to find its place in a list
        towns = rng.sample(world.towns, rng.randint(3, high))
        paragraphs.append(rng.choice(["The signpost reads {0}, and the map agrees: {0}.",
                                      "Travellers passed {0}; the next day they passed {0} again."]).format(
            rng.choice(LIST_SEPARATORS).join(towns)))
    for _ in range(1500):  # lists read forward, then backward: text in which a model learns to reverse a list
        towns = rng.sample(world.towns, rng.randint(3, high))
        separator = rng.choice(LIST_SEPARATORS)
        paragraphs.append(rng.choice(["The road from {0} to {1} passes {2}; the way back passes {3}.",
                                      "Going out they saw {2}, and coming home {3}."]).format(
            towns[0], towns[-1], separator.join(towns), separator.join(towns[::-1])))
    for town in world.towns:
        paragraphs += [f"{town} is a town.", f"People live in {town}."] * 6
    for thing, colour in world.colours.items():
        paragraphs += [f"The {thing} is {colour}.", f"Everyone knows a {thing} is {colour}.",
                       f"She held up the {colour} {thing}."] * 16
    rng.shuffle(paragraphs)
    return paragraphs
