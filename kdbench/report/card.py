"""The protocol card: what every row of a leaderboard was trained and scored under, in words.

Published baselines move by points between groups for want of stating this (docs/protocols.md). The card
is written into every result when the cell is scored, from the experiment it ran under, and printed above
the leaderboard; a results folder whose cells disagree prints one card per variant, so a mixed leaderboard
shows that it is mixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdbench.config import Experiment, TrainingConfig

ProtocolCard = dict[str, str]
CARD_FIELDS = ("protocol", "base", "teacher", "init", "budget", "lm term", "teacher signal", "selection", "training seeds",
               "evaluation")


def _budget(settings: TrainingConfig) -> str:
    length = f"{settings.max_steps} optimizer steps" if settings.max_steps else f"{settings.epochs:g} epochs"
    return f"{length} of {settings.batch_size} × {settings.grad_accum} sequences per process, lr {settings.lr:g}"


def _lm_term(experiment: Experiment) -> str:
    """The CE term every method mixes in, and the pre-training term where the protocol has one."""
    def term(settings: TrainingConfig) -> str:
        return (f"{settings.lm_coef:g} × ({1 - settings.lm_kd_ratio:g}·CE + {settings.lm_kd_ratio:g}·word-KD) on "
                f"{experiment.lm_data.dataset if experiment.lm_data else '?'}")

    text = "(1 − kd_ratio)·CE on the training responses (gold unless a method's train_on says otherwise)"
    shared = term(experiment.training) if experiment.training.lm_coef > 0 else "no pre-training term"
    own = {method: term(experiment.training_for(method)) for method, overrides in experiment.method_training.items()
           if "lm_coef" in overrides or "lm_kd_ratio" in overrides}
    return f"{text}; {shared}" + "".join(f"; {method}: {value}" for method, value in own.items())


def _shipped(folders: Mapping[str, str], field: str, command: str) -> str:
    """", shipped in models.<field> (<family>: <folder>, ...; made by kdbench <command>)", or "" when none is."""
    if not folders:
        return ""
    named = ", ".join(f"{family}: {Path(folder).parent.name}/{Path(folder).name}"  # the same on every machine
                      for family, folder in folders.items())
    return f", shipped in models.{field} ({named}; made by kdbench {command})"


def protocol_card(experiment: Experiment, train_seeds: Sequence[int]) -> ProtocolCard:
    """The card of ``experiment`` run with ``train_seeds``."""
    selection, evaluation = experiment.selection, experiment.evaluation
    chosen_by = (f"selected by validation loss every {experiment.init_select_every} steps"
                 if experiment.init.rule == "best" else
                 f"its final checkpoint (validation loss recorded every {experiment.init_select_every} steps)")
    init = f"one SFT student per training seed ({_budget(experiment.init_training)}), {chosen_by}"
    # trained once by `kdbench export-inits` with the init block, and read
    init += _shipped(experiment.models.sft_inits, "sft_inits", "export-inits")
    if experiment.protocol == "uniform":
        start = init if experiment.init.start == "sft" else "the base model"
        budget = f"every method's own stage: {_budget(experiment.training)}"
        if experiment.method_training:
            budget += f"; overrides (no budget field): {experiment.method_training}"
    else:
        start = f"the base model; a method whose recipe starts from an SFT student (Need.SFT_INIT): {init}"
        budget = f"{_budget(experiment.training)}; per-method recipes: {experiment.method_training or 'none'}"
    if selection.rule == "final":
        chosen = f"final checkpoint (validation {selection.metric} recorded every {selection.every} steps)"
    else:
        decoding = "greedy" if selection.greedy else "one sample"
        how = "" if selection.metric == "loss" else f", {decoding} decoding"
        chosen = f"best validation {selection.metric}{how}, every {selection.every} optimizer steps"
    decoding = (f"sampled (temperature 1, top-k 0, top-p 1), seeds {', '.join(map(str, evaluation.seeds))}"
                + (" + greedy" if evaluation.greedy else ""))
    card = {
        "protocol": experiment.protocol,
        "init": start,
        "budget": budget,
        "lm term": _lm_term(experiment),
        "selection": chosen,
        "training seeds": ", ".join(map(str, train_seeds)),
        "evaluation": f"{evaluation.split} split, {decoding}; ranked by {evaluation.primary}",
    }
    pretrain = experiment.pretrain
    if pretrain is not None:  # absent: tiny models start from a random initialisation, as cards before it say
        card["base"] = (f"every model pretrained on {pretrain.corpus.dataset}'s corpus ({_budget(pretrain.training)}), "
                        f"selected by held-out loss{_shipped(experiment.models.bases, 'bases', 'export-bases')}; costs "
                        "count from it, as from a paper-scale checkpoint")
    if experiment.teacher.data is not None:
        own = ", ".join(f"{key} {value}" for key, value in experiment.teacher.data.options.items())
        card["teacher"] = (f"SFT on its own instruction set ({experiment.teacher.data.dataset}: {own}; "
                           f"{_budget(experiment.teacher_training)})"
                           f"{_shipped(experiment.models.teachers, 'teachers', 'export-teachers')}")
    outputs = experiment.teacher_outputs
    if outputs.share:  # absent: every stage runs the teacher itself, as cards written before the option say too
        kept = "exact distributions" if outputs.top_k is None else f"top {outputs.top_k} tokens with an even tail"
        card["teacher signal"] = (f"teacher-forced methods read the teacher's stored outputs on the gold training "
                                  f"sequences ({kept}), computed once per teacher")
    return card


def cards_of(results: Sequence[Mapping[str, Any]]) -> list[ProtocolCard]:
    """The distinct cards of a results folder's cells, in first-seen order (one for a consistent grid)."""
    cards: list[ProtocolCard] = []
    for result in results:
        card = result.get("protocol_card")
        if card and card not in cards:
            cards.append(dict(card))
    return cards


def render_card(card: ProtocolCard) -> str:
    """Plain-text lines, ``field: value``, in the card's order."""
    return "\n".join(f"{name}: {card[name]}" for name in CARD_FIELDS if name in card)
