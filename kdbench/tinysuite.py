"""The tiny suite: a deterministic instruction data set that a 2-core CPU can learn in minutes.

Records follow Dolly's schema (instruction, context, response) plus the list of acceptable
answers, so the paper-scale loaders and the evaluation share one path. The suite is built to be a
real benchmark rather than a smoke test:

* knowledge decides: an invented world of many people, each with a town, colour, pet, job and
  age, holds far more facts than a small student can store in its training budget but within the
  teacher's. ``fact`` asks one of them in one of several phrasings, all used in training (closed-book
  recall of trained knowledge), and ``describe`` states them all in one sentence. A student learns
  the sentence's template quickly, then guesses the facts from their frequencies; a teacher recalls them;
* nothing else is slow to learn: the student learns the templates and categories within about 3,000
  steps; what it still gains with a longer budget is slowly memorised facts. The algorithmic
  tasks (``reverse``, ``sort``, ``add``) stay available as options but are off by default: a 2-layer
  student learns them only after thousands of steps;
* responses vary in length, from one word (``fact``) to whole sentences (``describe``);
* some tasks have one right answer (exact match is meaningful) and some have many (``example``,
  ``pick``), so mode-seeking and mean-seeking objectives can differ.

Everything derives from one integer seed: the same seed gives byte-identical splits.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

TASKS = ("fact", "describe", "reverse", "sort", "add", "example", "pick")

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "k", "m"]

COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey", "pink", "gold"]
PETS = ["cat", "dog", "horse", "goat", "parrot", "rabbit", "turtle", "owl", "fox", "frog", "snake", "duck"]
JOBS = ["baker", "farmer", "doctor", "pilot", "singer", "painter", "teacher", "tailor", "miner", "sailor"]
CATEGORIES: dict[str, list[str]] = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "pear", "plum"],
    "tool": ["axe", "drill", "hammer", "knife", "saw", "spade", "wrench"],
    "instrument": ["drum", "flute", "guitar", "harp", "piano", "violin"],
    "vehicle": ["bike", "boat", "bus", "car", "train", "truck", "van"],
    "tree": ["ash", "birch", "cedar", "elm", "maple", "oak", "pine", "willow"],
    "metal": ["copper", "gold", "iron", "lead", "silver", "tin", "zinc"],
}
WORDS = sorted({w for members in CATEGORIES.values() for w in members} | set(COLORS) | set(PETS))

# Several phrasings per attribute, all of them used in training: a model must store the fact, not
# the string of one question.
FACT_QUESTIONS: dict[str, list[str]] = {
    "town": ["Where does {name} live?", "In which town does {name} live?", "What is the home town of {name}?"],
    "color": ["What is the favourite colour of {name}?", "Which colour does {name} like best?"],
    "pet": ["What pet does {name} keep?", "Which animal lives with {name}?"],
    "job": ["What does {name} do for a living?", "What is the job of {name}?"],
}


@dataclass(frozen=True)
class TinySuiteOptions:
    """Size knobs of the suite. The defaults are the calibrated benchmark in experiments/tiny.yaml."""

    seed: int = 1234
    n_people: int = 1000
    n_towns: int = 16
    n_train: int = 40000
    n_validation: int = 200
    n_test: int = 4000
    task_weights: dict[str, float] = field(
        default_factory=lambda: {
            # reverse, sort and add stay available (weight > 0 turns them on) but are off in the benchmark: a
            # 2-layer student learns them given time but not within a CPU budget, so they measured budget, not
            # objectives (the student was still climbing at 4,000 steps).
            "fact": 4.0, "describe": 2.0, "example": 0.5, "pick": 0.5
        }
    )


@dataclass(frozen=True)
class Person:
    name: str
    town: str
    color: str
    pet: str
    job: str
    age: int


def _pseudo_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _unique_words(rng: random.Random, count: int, syllables: tuple[int, int]) -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        word = _pseudo_word(rng, rng.randint(*syllables)).capitalize()
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def make_world(options: TinySuiteOptions) -> list[Person]:
    rng = random.Random(options.seed)
    towns = _unique_words(rng, options.n_towns, (2, 2))
    names = _unique_words(rng, options.n_people, (2, 3))
    return [
        Person(name, rng.choice(towns), rng.choice(COLORS), rng.choice(PETS), rng.choice(JOBS), rng.randint(18, 90))
        for name in names
    ]


def _record(task: str, instruction: str, context: str, references: list[str]) -> dict[str, object]:
    return {"task": task, "instruction": instruction, "context": context, "response": references[0],
            "references": references}


def _describe(person: Person) -> str:
    # The name is not repeated: copying a multi-token name from the prompt needs an induction circuit that a
    # 2-layer student forms only after thousands of steps, so the student would plateau late on a skill that
    # says nothing about knowledge.
    return (f"A {person.job} from {person.town}, {person.age} years old, who keeps a {person.pet} "
            f"and likes {person.color} best.")


def _fact_answer(person: Person, attribute: str) -> str:
    return getattr(person, attribute)


def _make_record(task: str, rng: random.Random, world: list[Person], fact_pool: list[tuple[int, str, int]]) -> dict[str, object]:
    if task == "fact":
        person_index, attribute, phrasing = rng.choice(fact_pool)
        person = world[person_index]
        question = FACT_QUESTIONS[attribute][phrasing].format(name=person.name)
        return _record(task, question, "", [_fact_answer(person, attribute)])
    if task == "describe":
        person = rng.choice(world)
        return _record(task, f"Describe {person.name} in one sentence.", "", [_describe(person)])
    if task == "reverse":
        words = rng.sample(WORDS, rng.randint(2, 4))
        return _record(task, "Write these words in reverse order.", " ".join(words), [" ".join(reversed(words))])
    if task == "sort":
        numbers = rng.sample(range(1, 31), rng.randint(2, 4))
        return _record(task, "Sort these numbers from smallest to largest.", " ".join(map(str, numbers)),
                       [" ".join(map(str, sorted(numbers)))])
    if task == "add":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return _record(task, f"What is {a} plus {b}?", "", [str(a + b)])
    if task == "example":
        category = rng.choice(sorted(CATEGORIES))
        members = CATEGORIES[category]
        # Every member is right; the stored response is one sampled answer.
        answers = [members[rng.randrange(len(members))]] + members
        return _record(task, f"Name one {category}.", "", list(dict.fromkeys(answers)))
    if task == "pick":
        category = rng.choice(sorted(CATEGORIES))
        members = CATEGORIES[category]
        # Any two members in the category's listed order are right: many acceptable answers.
        pairs = [f"{a} and {b}" for a, b in itertools.combinations(members, 2)]
        first = pairs[rng.randrange(len(pairs))]
        return _record(task, f"Name two kinds of {category}, in alphabetical order.", "",
                       list(dict.fromkeys([first] + pairs)))
    raise ValueError(f"unknown tiny-suite task {task!r}; expected one of {', '.join(TASKS)}")


def generate(options: TinySuiteOptions) -> dict[str, list[dict[str, object]]]:
    """Return ``{"train", "validation", "test"}`` lists of records, deterministic in ``options``."""
    unknown = sorted(set(options.task_weights) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tiny-suite tasks {unknown}; expected some of {', '.join(TASKS)}")
    world = make_world(options)
    rng = random.Random(options.seed + 1)
    # Every (person, attribute, phrasing) question may be asked in any split: evaluation asks facts
    # the training records state (closed-book recall), so what separates models is how much of the
    # world they stored, not whether they guess an unseen phrasing.
    facts = [(p, attribute, k) for p in range(len(world)) for attribute, phrasings in FACT_QUESTIONS.items()
             for k in range(len(phrasings))]

    tasks = sorted(options.task_weights)
    weights = [options.task_weights[t] for t in tasks]

    def draw(n: int, seen: set[tuple[str, str]]) -> list[dict[str, object]]:
        records: list[dict[str, object]] = []
        while len(records) < n:
            record = _make_record(rng.choices(tasks, weights)[0], rng, world, facts)
            key = (str(record["instruction"]), str(record["context"]))
            # Facts, descriptions and the small addition table repeat on purpose (they are
            # memorised); reverse and sort prompts of evaluation splits never appear in training.
            if key in seen and record["task"] in ("reverse", "sort"):
                continue
            records.append(record)
        return records

    train = draw(options.n_train, set())
    train_keys = {(str(r["instruction"]), str(r["context"])) for r in train}
    validation = draw(options.n_validation, train_keys)
    test = draw(options.n_test, train_keys)
    return {"train": train, "validation": validation, "test": test}


def world_corpus(options: TinySuiteOptions) -> list[str]:
    """Plain text about the suite's world, the tiny stand-in for OpenWebText in the pre-training LM term: one short
    paragraph per person (the facts the instructions ask about, in prose) and one per category of things. The same
    ``seed`` gives the same world as ``generate``."""
    paragraphs = [f"{person.name} lives in {person.town}. {person.name} works as a {person.job} and is {person.age} "
                  f"years old. The favourite colour of {person.name} is {person.color}, and {person.name} keeps a "
                  f"{person.pet}." for person in make_world(options)]
    paragraphs += [f"Kinds of {category}: {', '.join(members)}." for category, members in sorted(CATEGORIES.items())]
    random.Random(options.seed + 2).shuffle(paragraphs)
    return paragraphs
