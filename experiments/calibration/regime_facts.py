"""The measured facts of the tiny suite's regime (experiments/tiny.md, "Measured facts"), as Markdown tables.

From the experiment file alone: every model's parameters (the shipped bases' configs), the size of the corpus and of
each instruction set, how often each set's gold is wrong per task, and each task's prompt and gold-response length in
tokens (the shipped tokenizer). With ``--results DIR`` (a folder written by ``kdbench run``) also each row's per-task
scores, and how often the teacher's sampled answers are wrong (100 − its exact match: a sample is right when it equals
a valid answer). Run from the repository root:

    python experiments/calibration/regime_facts.py --results results/reference/tiny-sizes
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from kdbench.config import load_experiment
from kdbench.data import prompt_fits, prompt_ids, tokenize_corpus
from kdbench.eval.scoring import normalize_answer
from kdbench.registry import load_registries
from kdbench.report.folder import load_folder
from kdbench.report.leaderboard import task_seed_scores
from kdbench.zoo import count_config_parameters, load_config, load_tokenizer


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def wrong_share(records: list[dict[str, Any]]) -> dict[str, float]:
    """Per task, the share of records whose gold response is not one of the valid answers."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        valid = {normalize_answer(ref) for ref in record["references"]}
        by_task[record["task"]].append(normalize_answer(record["response"]) not in valid)
    return {task: 100 * sum(flags) / len(flags) for task, flags in sorted(by_task.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", "-e", type=Path, default=None, help="default: the embedded tiny.yaml")
    parser.add_argument("--results", type=Path, default=None, help="a results folder for the per-task scores")
    args = parser.parse_args()
    experiment = load_experiment(args.experiment)
    registries = load_registries()
    family = experiment.models.families[0]
    bases = Path(experiment.models.bases[family])
    tokenizer = load_tokenizer(str(bases / "teacher"))

    print("## Models\n")
    rows = []
    for name in experiment.models.families:
        for folder in sorted(Path(experiment.models.bases[name]).iterdir()):
            config = load_config(str(folder))
            rows.append([name, folder.name, f"{count_config_parameters(config):,}",
                         f"{config.get_text_config().hidden_size} × {config.get_text_config().num_hidden_layers}"])
    print(table(["family", "model", "parameters", "width × layers"], rows))

    print("\n## Data\n")
    assert experiment.pretrain is not None and experiment.teacher.data is not None
    corpus_spec = registries.datasets.get(experiment.pretrain.corpus.dataset)
    assert corpus_spec.corpus is not None
    corpus = corpus_spec.corpus(dict(experiment.pretrain.corpus.options))
    chunks = tokenize_corpus(corpus, tokenizer, experiment.data.max_length)
    print(f"Pretraining corpus: {len(corpus):,} paragraphs, {sum(len(p.split()) for p in corpus):,} words, "
          f"{len(chunks):,} chunks of {experiment.data.max_length} tokens "
          f"({len(chunks) * experiment.data.max_length:,} tokens).\n")
    sets = {"teacher's set": (experiment.teacher.data.dataset, experiment.teacher.data.options),
            "distillation set": (experiment.data.dataset, experiment.data.options)}
    loaded = {label: registries.datasets.get(name).load(dict(options)) for label, (name, options) in sets.items()}
    tasks = sorted({r["task"] for r in loaded["distillation set"]["test"]})
    rows = [[label, *(f"{len(splits[s]):,}" for s in ("train", "validation", "test")),
             *(f"{wrong_share(splits['train']).get(task, 0.0):.1f}%" for task in tasks)]
            for label, splits in loaded.items()]
    print(table(["set", "train", "validation", "test", *(f"gold wrong: {t}" for t in tasks)], rows))

    # Prompts over data.max_prompt_length tokens are left out of training and evaluation (kdbench.data), so each
    # set is counted as generated and as kept.
    limit = experiment.data.max_prompt_length

    def fits(record: dict[str, Any]) -> bool:
        return prompt_fits(record, tokenizer, limit)

    print(f"\n## Records kept (prompt ≤ data.max_prompt_length = {limit} tokens), per task: kept / generated\n")
    rows = [[f"{label}: {split}", *(f"{sum(fits(r) for r in splits[split] if r['task'] == task):,} / "
                                    f"{sum(r['task'] == task for r in splits[split]):,}" for task in tasks)]
            for label, splits in loaded.items() for split in ("train", "validation", "test")]
    print(table(["set: split", *tasks], rows))

    print("\n## Lengths (tokens, the kept test prompts; mean [min, max])\n")
    rows = []
    test = [r for r in loaded["distillation set"]["test"] if fits(r)]
    for task in tasks:
        records = [r for r in test if r["task"] == task]
        prompts = [len(prompt_ids(r, tokenizer)) for r in records]
        answers = [len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for r in records for ref in r["references"]]
        rows.append([task, len(records), f"{statistics.fmean(prompts):.1f} [{min(prompts)}, {max(prompts)}]",
                     f"{statistics.fmean(answers):.1f} [{min(answers)}, {max(answers)}]",
                     f"{statistics.fmean(len(r['references']) for r in records):.1f}"])
    print(table(["task", "test prompts", "prompt", "valid answer", "valid answers per prompt"], rows))

    if args.results is None:
        return
    folder = load_folder(args.results)
    print(f"\n## Per-task scores ({args.results}; mean over training seeds of the mean over evaluation seeds)\n")
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in folder.results:
        if result["status"] == "ok":
            groups[result["family"], result["student"], result["method"]].append(result)
    rows, teacher_wrong = [], []
    for (family_name, student, method), results in sorted(groups.items()):
        means = {metric: {task: statistics.fmean(by_seed.values())
                          for task, by_seed in task_seed_scores(results, metric).items()}
                 for metric in ("rougeL", "exact_match")}
        rows.append([family_name, student, method,
                     *(f"{means['rougeL'][t]:.1f} / {means['exact_match'][t]:.1f}" for t in tasks)])
        if method == "teacher":
            teacher_wrong.append(f"- {family_name}: " + ", ".join(f"{t} {100 - means['exact_match'][t]:.1f}%"
                                                                  for t in tasks))
    print(table(["family", "model", "method", *(f"{t}: ROUGE-L / EM" for t in tasks)], rows))
    print("\nThe teacher's sampled answers that are not a valid answer (100 − exact match), per task:")
    print("\n".join(teacher_wrong))


if __name__ == "__main__":
    main()
