"""Paper-scale faithfulness: one prompt tokenisation everywhere (no BOS, as MiniLLM's preprocessing), MiniLLM's
eval-mode policy with log-probabilities recomputed after sampling, and the pseudo-data recipes (MiniLLM's
SeqKD baseline, DPKD's released code) through ``train_on``. Real tiny models through the real engine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

from kdbench.config import TrainingConfig
from kdbench.contracts import Metric, PromptOrder, Sequences, SourceContext
from kdbench.data import TEMPLATE_PIECES, Record, TokenizedExample, format_prompt, prompt_ids, tokenize_records
from kdbench.errors import KdbenchError
from kdbench.eval.evaluation import evaluate
from kdbench.eval.scoring import rouge_l
from kdbench.objectives import GOLD, LossInputs, ObjectiveParams, gold_cross_entropy
from kdbench.process import seeded
from kdbench.tinysuite import TinySuiteOptions, generate
from kdbench.train.engine import TrainingData, train
from kdbench.train.generation import generate_responses
from kdbench.train.step import step_reads
from kdbench.zoo import TinyArch, build_tiny_model, load_model, train_tokenizer
from kdbench_plugins.dpkd_token import DPKDToken, token_preference_loss
from kdbench_plugins.families import GPT2, OPT
from kdbench_plugins.kd import KD, soft_cross_entropy
from kdbench_plugins.minillm import MiniLLM, MiniLLMParams
from kdbench_plugins.seqkd import SeqKD
from kdbench_plugins.sources import Gold, RolloutOptions, Rollouts, StudentSamples, TeacherText

SOURCES = {source.name: source for source in (Gold, TeacherText, StudentSamples, Rollouts)}
POSITIONS = 64


def settings(**overrides: object) -> TrainingConfig:
    values: dict = {"engine": "accelerate", "lr": 3e-3, "batch_size": 8, "max_steps": 1, "warmup_steps": 0}
    values.update(overrides)
    return TrainingConfig(**values)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tokenizer trained on the tiny suite, and its training records."""
    root = tmp_path_factory.mktemp("faithfulness")
    splits = generate(TinySuiteOptions(n_train=200, n_validation=4, n_test=4))
    train_tokenizer((format_prompt(r) + r["response"] for r in splits["train"]), 400, root / "tok", TEMPLATE_PIECES)
    return {"root": root, "records": splits["train"]}


# -- one prompt tokenisation ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def opt_like(suite: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer configured like OPT's (``add_bos_token``, BOS = ``</s>`` = EOS) and tiny OPT models."""
    root = suite["root"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tok", add_bos_token=True)
    build_tiny_model(OPT, TinyArch(16, 1, 1), tokenizer, POSITIONS, 0, root / "opt-student")
    build_tiny_model(OPT, TinyArch(16, 1, 1), tokenizer, POSITIONS, 1, root / "opt-teacher")
    records = [r for r in suite["records"] if len(prompt_ids(r, tokenizer)) <= 40][:6]
    return {"tokenizer": tokenizer, "records": records, "student": load_model(str(root / "opt-student")),
            "teacher": load_model(str(root / "opt-teacher"))}


@contextmanager
def prompts_seen(model: torch.nn.Module) -> Iterator[list[tuple[int, ...]]]:
    """The unpadded prompt rows of every prefill (a forward pass over more than one new token) ``model`` runs."""
    seen: list[tuple[int, ...]] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if ids.shape[1] > 1:
            seen.extend(tuple(row[keep.bool()].tolist()) for row, keep in zip(ids, mask))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def context_for(examples: list[TokenizedExample], tokenizer: Any, student: torch.nn.Module,
                teacher: torch.nn.Module | None) -> SourceContext:
    order = PromptOrder([len(e.input_ids) for e in examples], len(examples), torch.Generator().manual_seed(0), 0, 1)
    return SourceContext(examples, None, order, lambda: student, teacher, torch.device("cpu"), tokenizer.pad_token_id,
                         tokenizer.eos_token_id, 4, POSITIONS, torch.Generator().manual_seed(1))


def test_every_path_tokenises_a_prompt_as_training_does(opt_like: dict[str, Any]) -> None:
    """With a tokenizer that prepends BOS by default, the prompt ids of training, of the student sampler, of
    rollouts, of stored teacher generations (and the teacher texts built from them) and of evaluation are
    the same, and none starts with BOS (MiniLLM's preprocessing adds none, for OPT too)."""
    tokenizer, records = opt_like["tokenizer"], opt_like["records"]
    student, teacher = opt_like["student"], opt_like["teacher"]
    text = format_prompt(records[0])
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id and tokenizer.add_bos_token  # OPT-like

    examples = tokenize_records(records, tokenizer, POSITIONS, 48)
    assert len(examples) == len(records)
    training = sorted(tuple(e.input_ids[: e.prompt_length]) for e in examples)
    assert training == sorted(tuple(prompt_ids(r, tokenizer)) for r in records)
    assert all(prompt[0] != tokenizer.bos_token_id for prompt in training)

    context = context_for(examples, tokenizer, student, teacher)
    with prompts_seen(student) as sampled:
        StudentSamples(context).sequences(list(range(len(examples))))
    with prompts_seen(student) as rolled:  # the first prefill is the sampler's (the recomputation follows it)
        Rollouts(context, RolloutOptions(batches=1, inner_epochs=1)).next_prompts()
    with prompts_seen(teacher) as generated:
        responses = generate_responses(teacher, tokenizer, records, "10", 4, 4)
    teacher_texts = tokenize_records([{**r, "response": y} for r, y in zip(records, responses)], tokenizer,
                                     POSITIONS, 48)
    metric = Metric("rougeL", "ROUGE-L", True, rouge_l)
    with prompts_seen(student) as evaluated:
        evaluate(student, tokenizer, records, [metric], ["10"], 4, 4)

    assert sorted(sampled) == training
    assert sorted(rolled[: len(examples)]) == training
    assert sorted(generated) == training
    assert sorted(tuple(e.input_ids[: e.prompt_length]) for e in teacher_texts) == training
    assert sorted(evaluated) == training


def test_lm_eval_heldout_task_sees_kdbench_prompt_ids(opt_like: dict[str, Any], tmp_path: Path) -> None:
    """The lm-eval copy of kdbench's evaluation (kdbench_heldout) prompts with the same ids, no BOS, although
    lm-eval would follow the tokenizer's default and prepend one."""
    pytest.importorskip("lm_eval")
    from kdbench.config import LmEvalConfig
    from kdbench.eval.lmeval import HELDOUT_TASK, lm_eval_scores

    tokenizer, records, student = opt_like["tokenizer"], opt_like["records"], opt_like["student"]
    training = sorted(tuple(prompt_ids(r, tokenizer)) for r in records)
    with prompts_seen(student) as seen:
        lm_eval_scores(student, tokenizer, LmEvalConfig(tasks=[HELDOUT_TASK], max_new_tokens=2), records, tmp_path)
    assert sorted(seen) == training


# -- minillm: eval-mode policy, log-probabilities recomputed -------------------------------------------

@pytest.fixture(scope="module")
def dropout_models(suite: dict[str, Any]) -> dict[str, Any]:
    """Tiny GPT-2 student and teacher whose configs have dropout 0.1 (residual, embedding, attention)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(suite["root"] / "tok")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=POSITIONS, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    models = {}
    for name, seed in (("student", 0), ("teacher", 1)):
        with seeded(seed):
            models[name] = AutoModelForCausalLM.from_config(config)
        models[name].save_pretrained(suite["root"] / f"dropout-{name}")
    examples = tokenize_records(suite["records"][:32], tokenizer, POSITIONS, 40)
    return {"tokenizer": tokenizer, "examples": examples, "root": suite["root"]}


def first_step_ratios(models: dict[str, Any], params: MiniLLMParams, train_mode: bool | None = None) -> list[torch.Tensor]:
    """``exp(log q_θ − log q_old)`` on every rollout token of the first optimizer step, which covers the first
    inner epoch of the first collection (grad_accum = rollout_batches), captured from a real engine run by an
    objective that is minillm but records what its loss receives (and, if given, overrides the mode)."""
    ratios: list[torch.Tensor] = []

    class Recording(MiniLLM):
        @staticmethod
        def loss(inputs: LossInputs, params: ObjectiveParams) -> torch.Tensor:
            view = inputs["rollouts"]
            log_q = F.log_softmax(view.student_logits.float(), dim=-1).gather(-1, view.labels.unsqueeze(-1)).squeeze(-1)
            ratios.append(torch.exp(log_q - view.extras["old_logp"])[view.mask].detach())
            return MiniLLM.loss(inputs, params)

        @classmethod
        def train_mode(cls, params: ObjectiveParams) -> bool:
            return MiniLLM.train_mode(params) if train_mode is None else train_mode

    tokenizer = models["tokenizer"]
    student = load_model(str(models["root"] / "dropout-student"))
    teacher = load_model(str(models["root"] / "dropout-teacher"))
    data = TrainingData(models["examples"], tokenizer.pad_token_id, tokenizer.eos_token_id, sample_max_new_tokens=8)
    train(student, Recording, params, data, settings(batch_size=4, grad_accum=params.rollout_batches), 0, teacher,
          sources=SOURCES)
    assert len(ratios) == params.rollout_batches and all(r.numel() > 0 for r in ratios)
    return ratios


def test_minillm_ratio_is_exactly_one_at_the_first_inner_step_despite_dropout(dropout_models: dict[str, Any]) -> None:
    """The released recipe (eval mode, recomputed log-probabilities): the PPO ratio of every rollout token is
    exactly 1 before the first update, with dropout 0.1 configured."""
    params = MiniLLM.make_params({"rollout_batches": 2, "inner_epochs": 2})
    assert params.recompute_logp and not MiniLLM.train_mode(params)
    for ratio in first_step_ratios(dropout_models, params):
        assert torch.equal(ratio, torch.ones_like(ratio))


def test_in_train_mode_dropout_moves_the_ratio_off_one(dropout_models: dict[str, Any]) -> None:
    """What eval mode fixes: with the policy in train mode, the pass that recorded q_old and the pass being
    updated draw different dropout masks, so the ratio is not 1 at the first inner step."""
    params = MiniLLM.make_params({"rollout_batches": 2, "inner_epochs": 2})
    ratios = torch.cat(first_step_ratios(dropout_models, params, train_mode=True))
    assert (ratios - 1).abs().max() > 1e-3


def test_minillm_passes_recompute_to_its_rollouts_and_bumps_versions() -> None:
    assert MiniLLM.source_options(MiniLLM.make_params({}))["rollouts"].recompute_logp
    assert not MiniLLM.source_options(MiniLLM.make_params({"recompute_logp": False}))["rollouts"].recompute_logp
    assert MiniLLM.version >= 2 and Rollouts.version >= 2


# -- train_on: the pseudo-data recipes ----------------------------------------------------------------

@pytest.fixture(scope="module")
def pseudo_data(suite: dict[str, Any]) -> dict[str, Any]:
    """Tiny GPT-2 teacher and student (the suite's family defaults) and 'teacher text': the training prompts
    with other records' responses, so gold and teacher text differ."""
    root = suite["root"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tok")
    build_tiny_model(GPT2, TinyArch(32, 2, 2), tokenizer, POSITIONS, 0, root / "gpt2-teacher")
    build_tiny_model(GPT2, TinyArch(16, 1, 1), tokenizer, POSITIONS, 1, root / "gpt2-student")
    records: list[Record] = suite["records"][:12]
    shifted = [{**r, "response": other["response"]} for r, other in zip(records, records[3:] + records[:3])]
    return {"root": root, "tokenizer": tokenizer, "gold": tokenize_records(records, tokenizer, POSITIONS, 48),
            "texts": tokenize_records(shifted, tokenizer, POSITIONS, 48)}


def logged_first_loss(setup: dict[str, Any], objective: Any, values: dict[str, Any]) -> tuple[float, Any]:
    """The loss the engine logs at its first step, on one micro-batch holding every example (before any update)."""
    tokenizer = setup["tokenizer"]
    student = load_model(str(setup["root"] / "gpt2-student"))
    teacher = load_model(str(setup["root"] / "gpt2-teacher"))
    data = TrainingData(setup["gold"], tokenizer.pad_token_id, tokenizer.eos_token_id, setup["texts"])
    _, stats = train(student, objective, objective.make_params(values), data,
                     settings(batch_size=len(setup["gold"])), 0, teacher, sources=SOURCES)
    return stats.log[0]["loss"], stats


def terms(setup: dict[str, Any], which: str = "texts") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token means of CE, word-KD and the dpkd-token loss (bf16 log-softmax) on the teacher text (or on gold)."""
    text = Sequences.collate(setup[which], setup["tokenizer"].pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        student, teacher = (load_model(str(setup["root"] / name))(input_ids=text.input_ids,
                                                                   attention_mask=text.attention_mask).logits[:, :-1]
                            for name in ("gpt2-student", "gpt2-teacher"))
    labels, mask = text.input_ids[:, 1:], text.response_mask[:, 1:]
    ce = gold_cross_entropy(student, labels, mask)[mask].mean()
    kd = soft_cross_entropy(student, teacher)[mask].mean()
    token = token_preference_loss(student, teacher, 0.1, torch.bfloat16)[mask].mean()
    return ce, kd, token


PAPER_SEQKD = {"kd_ratio": 0.5, "train_on": "teacher_text", "word_kd": True, "word_kd_weight": 1.0}


def test_paper_seqkd_is_half_ce_plus_half_word_kd_on_teacher_text(pseudo_data: dict[str, Any]) -> None:
    """MiniLLM's SeqKD baseline as seqkd's parameters: 0.5·CE(teacher text) + 0.5·word-KD(teacher text), no gold;
    the teacher text runs through the student once for both terms, and kd on the teacher text is the same."""
    ce, kd, _ = terms(pseudo_data)
    loss, stats = logged_first_loss(pseudo_data, SeqKD, PAPER_SEQKD)
    assert loss == pytest.approx(float(0.5 * ce + 0.5 * kd), rel=1e-5)
    assert stats.student_forwards == 1 and stats.teacher_forwards == 1
    assert step_reads(SeqKD, SeqKD.make_params(PAPER_SEQKD)) == ("teacher_text",)  # no gold at all
    kd_loss, _ = logged_first_loss(pseudo_data, KD, {"kd_ratio": 0.5, "train_on": "teacher_text"})
    assert kd_loss == pytest.approx(loss, rel=1e-6)


def test_uniform_seqkd_still_mixes_gold_ce(pseudo_data: dict[str, Any]) -> None:
    """The default (uniform) seqkd keeps its CE term on gold and reads both sources."""
    params = SeqKD.make_params({"word_kd": True})
    assert params.train_on == GOLD and step_reads(SeqKD, params) == (GOLD, "teacher_text")
    loss, stats = logged_first_loss(pseudo_data, SeqKD, {"word_kd": True})
    (ce, kd, _), (gold_ce, _, _) = terms(pseudo_data), terms(pseudo_data, "gold")
    assert loss == pytest.approx(float(0.5 * gold_ce + 0.5 * (0.5 * ce + 0.5 * kd)), rel=1e-5)
    assert stats.student_forwards == 2 and stats.teacher_forwards == 1


def test_released_dpkd_token_reads_the_teacher_text_for_both_terms(pseudo_data: dict[str, Any]) -> None:
    """dpkd-token as released: 0.5·CE + 0.5·L_token, both on the teacher's pseudo data, log-softmax in bf16."""
    values = {"kd_ratio": 0.5, "train_on": "teacher_text", "beta": 0.1, "logsoftmax_dtype": "bfloat16"}
    ce, _, token = terms(pseudo_data)
    loss, stats = logged_first_loss(pseudo_data, DPKDToken, values)
    assert loss == pytest.approx(float(0.5 * ce + 0.5 * token), rel=1e-5)
    assert stats.student_forwards == 1


def test_bf16_log_softmax_is_an_option_and_float32_the_default() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 50) * 4, torch.randn(2, 5, 50) * 4
    assert DPKDToken.make_params({}).logsoftmax_dtype == "float32"
    fp32, bf16 = token_preference_loss(student, teacher, 0.1), token_preference_loss(student, teacher, 0.1, torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=5e-2, rtol=0)
    assert not torch.equal(bf16, fp32)
    with pytest.raises(KdbenchError, match="logsoftmax_dtype"):
        DPKDToken.make_params({"logsoftmax_dtype": "fp8"})
    with pytest.raises(KdbenchError, match="train_on"):
        KD.make_params({"train_on": ""})
