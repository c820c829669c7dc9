"""lm-evaluation-harness scoring of in-memory models: the kdbench_heldout task reproduces kdbench's own
greedy evaluation, limits and key names follow the interface, and unknown tasks are explained."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from kdbench.config import LmEvalConfig, TrainingConfig
from kdbench.data import TEMPLATE_PIECES, format_prompt, normalize_record, tokenize_records
from kdbench.errors import KdbenchError
from kdbench.eval.evaluation import evaluate
from kdbench.eval.lmeval import HELDOUT_TASK, lm_eval_scores, unknown_tasks, write_heldout_task
from kdbench.tinysuite import TinySuiteOptions, generate
from kdbench.train.engine import TrainingData, train
from kdbench.zoo import TinyArch, build_tiny_model, load_model, load_tokenizer, train_tokenizer
from kdbench_plugins.families import GPT2
from kdbench_plugins.metrics import EXACT_MATCH, ROUGE_L
from kdbench_plugins.sft import SFT

POSITIONS = 64  # the tiny suite's GPT-2: prompt + answer must fit these learned positions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A tiny GPT-2 loaded with from_pretrained and briefly SFT-trained on 64 records, and 32 evaluation
    records: half of them trained on (greedy answers mostly right, ending in EOS), half held out
    (mostly wrong, some running to the token budget), so both ways a generation ends are compared."""
    # One torch thread: these matrices are tiny, and two threads on a busy 2-core machine were seen to
    # spin-wait each other into a 50x slower fixture. Restored after the module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lmeval")
    splits = generate(TinySuiteOptions(n_train=64, n_validation=8, n_test=16, list_towns=(3, 5)))  # prompts fit 64 positions
    splits = {name: [normalize_record(r, f"tiny/{name}") for r in records] for name, records in splits.items()}
    train_tokenizer((format_prompt(r) + r["response"] for r in splits["train"]), 400, root / "tok", TEMPLATE_PIECES)
    build_tiny_model(GPT2, TinyArch(32, 2, 2), load_tokenizer(str(root / "tok")), POSITIONS, 0, root / "model")
    tokenizer, model = load_tokenizer(str(root / "model")), load_model(str(root / "model"))
    config = TrainingConfig(engine="accelerate", lr=1e-2, batch_size=16, max_steps=150, warmup_steps=10)
    examples = tokenize_records(splits["train"], tokenizer, POSITIONS, 48)
    model, _ = train(model, SFT, SFT.make_params({}), TrainingData(examples, tokenizer.pad_token_id), config, 0)
    yield {"model": model, "tokenizer": tokenizer, "records": splits["train"][:16] + splits["test"]}
    torch.set_num_threads(threads)


def kdbench_greedy(tiny: dict, records: list, max_new_tokens: int) -> dict[str, float]:
    result = evaluate(tiny["model"], tiny["tokenizer"], records, [ROUGE_L, EXACT_MATCH], ["greedy"],
                      max_new_tokens=max_new_tokens, batch_size=5)
    return {name: by_seed["greedy"] for name, by_seed in result["metrics"].items()}


@pytest.fixture(scope="module")
def own_scores(tiny: dict) -> dict[str, float]:
    """kdbench's own greedy evaluation of every record, 16 new tokens."""
    return kdbench_greedy(tiny, tiny["records"], max_new_tokens=16)


def test_heldout_task_reproduces_kdbench_greedy_evaluation(tiny: dict, own_scores: dict, tmp_path: Path) -> None:
    """Same model, same records: lm-eval's generate_until with kdbench's metrics gives kdbench's numbers.

    The batch sizes differ on purpose (lm-eval 8, sorted by token length; kdbench 5, by characters), so
    rows meet different left padding; 16 new tokens keep every prompt + answer inside the 64 positions,
    so neither side caps the budget. Left padding changes float sums in their last bits, which can flip one greedy
    near-tie (seen once on these 32 records): the scores may differ by at most one record's worth."""
    records, own = tiny["records"], own_scores
    settings = LmEvalConfig(tasks=[HELDOUT_TASK], batch_size=8, max_new_tokens=16)
    result = lm_eval_scores(tiny["model"], tiny["tokenizer"], settings, records, tmp_path)
    scores = result.values
    assert set(scores) == {f"{HELDOUT_TASK}/rougeL", f"{HELDOUT_TASK}/exact_match"}  # no stderr, alias, sample_len
    assert result.higher_is_better == {name: True for name in scores}  # as the task YAML declares
    assert 0 < own["rougeL"] < 100, "the trained model should be partly right, or the comparison proves little"
    one_record = 100.0 / len(records)
    assert scores[f"{HELDOUT_TASK}/rougeL"] == pytest.approx(own["rougeL"], abs=one_record)
    assert scores[f"{HELDOUT_TASK}/exact_match"] == pytest.approx(own["exact_match"], abs=one_record)


def test_limit_scores_the_first_records_only(tiny: dict, own_scores: dict, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's limit keeps the first records; run from another working directory with a relative
    work_dir, the written task still finds its data and its !function module."""
    records = tiny["records"]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    settings = LmEvalConfig(tasks=[HELDOUT_TASK], limit=5, batch_size=4, max_new_tokens=16)
    scores = lm_eval_scores(tiny["model"], tiny["tokenizer"], settings, records, Path("work")).values
    own_first = kdbench_greedy(tiny, records[:5], max_new_tokens=16)
    assert scores == {f"{HELDOUT_TASK}/rougeL": pytest.approx(own_first["rougeL"], abs=1e-9),
                      f"{HELDOUT_TASK}/exact_match": pytest.approx(own_first["exact_match"], abs=1e-9)}
    assert own_first != own_scores  # the first five alone score differently from all records


def test_long_budget_is_capped_to_the_model_positions(tiny: dict, tmp_path: Path) -> None:
    """64 new tokens on a 64-position GPT-2: HFLM alone would assert (no room left for the prompt) or
    cut prompts from the left; the task caps the budget at positions − longest prompt instead. The
    model and the RNG state come back as they were."""
    model = tiny["model"]
    model.train()
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    scores = lm_eval_scores(model, tiny["tokenizer"], LmEvalConfig(tasks=[HELDOUT_TASK], limit=6), tiny["records"],
                            tmp_path).values
    assert torch.equal(torch.rand(3), expected_next) and model.training
    assert all(0 <= value <= 100 for value in scores.values())
    config = yaml.load((tmp_path / HELDOUT_TASK / f"{HELDOUT_TASK}.yaml").read_text(), Loader=yaml.BaseLoader)
    longest = max(len(tiny["tokenizer"](format_prompt(r))["input_ids"]) for r in tiny["records"][:6])
    assert int(config["generation_kwargs"]["max_gen_toks"]) == POSITIONS - longest

    # Same folder, new budget: the cached task index must read the rewritten YAML, not the first one.
    short = lm_eval_scores(model, tiny["tokenizer"], LmEvalConfig(tasks=[HELDOUT_TASK], limit=6, max_new_tokens=2),
                           tiny["records"], tmp_path).values
    own_short = kdbench_greedy(tiny, tiny["records"][:6], max_new_tokens=2)
    assert short == {f"{HELDOUT_TASK}/{name}": pytest.approx(value, abs=1e-9) for name, value in own_short.items()}
    assert short != scores

    too_long = [{**tiny["records"][0], "instruction": " ".join(["word"] * 80)}]
    with pytest.raises(KdbenchError, match="positions"):
        lm_eval_scores(model, tiny["tokenizer"], LmEvalConfig(tasks=[HELDOUT_TASK]), too_long, tmp_path)


def test_written_task_is_self_contained(tiny: dict, tmp_path: Path) -> None:
    """Absolute data path in the YAML and the !function module beside it: any working directory works."""
    folder = write_heldout_task(tiny["records"], tmp_path / "task", max_new_tokens=12)
    text = (folder / f"{HELDOUT_TASK}.yaml").read_text()
    assert str((folder / f"{HELDOUT_TASK}.jsonl").resolve()) in text and "max_gen_toks: 12" in text
    assert (folder / "kdbench_heldout_functions.py").is_file()
    assert len((folder / f"{HELDOUT_TASK}.jsonl").read_text().splitlines()) == len(tiny["records"])


@pytest.mark.slow
def test_unknown_task_names_get_did_you_mean_and_the_fix(tiny: dict, tmp_path: Path) -> None:
    lines = unknown_tasks(LmEvalConfig(tasks=["hellaswg", HELDOUT_TASK, "arc_easy"]))
    assert len(lines) == 1
    assert "'hellaswg'" in lines[0] and "did you mean 'hellaswag'" in lines[0] and "include_path" in lines[0]
    assert unknown_tasks(LmEvalConfig()) == []
    with pytest.raises(KdbenchError, match="did you mean 'kdbench_heldout'"):
        lm_eval_scores(tiny["model"], tiny["tokenizer"], LmEvalConfig(tasks=["kdbench_heldot"]), tiny["records"],
                       tmp_path)


def test_missing_lm_eval_says_how_to_install(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what Python does when the package is absent
    with pytest.raises(KdbenchError, match=r"pip install 'kdbench\[lm-eval\]'"):
        lm_eval_scores(tiny["model"], tiny["tokenizer"], LmEvalConfig(tasks=[HELDOUT_TASK]), tiny["records"], tmp_path)
    assert "pip install 'kdbench[lm-eval]'" in unknown_tasks(LmEvalConfig(tasks=["hellaswag"]))[0]
