"""Model families, the tiny models built from their config classes, and the one loading path.

Every model, tiny or paper scale, is an ordinary Hugging Face folder (or hub name) loaded with
``from_pretrained``; the tiny ones are simply written by kdbench first, so the rest of the harness
never knows the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from kdbench.errors import KdbenchError
from kdbench.process import seeded

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"

# The models (hub names, or local folders) whose own Python code transformers may import and run: none, unless an
# experiment names them in ``models.trust_remote_code`` and the run opens ``remote_code_trusted`` with them.
_TRUSTED: ContextVar[frozenset[str]] = ContextVar("kdbench_trusted_remote_code", default=frozenset())


def _identity(name_or_path: str) -> str:
    """A local folder by its resolved path (the same folder however it is written, made yet or not), a hub name as
    it is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() or path.is_absolute() else name_or_path


@contextmanager
def remote_code_trusted(names: Iterable[str]) -> Iterator[None]:
    """Inside, the models ``names`` (hub names or folders) may run their own code when loaded; on exit, none again."""
    token = _TRUSTED.set(frozenset(_identity(name) for name in names))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def trusts_remote_code(name_or_path: str) -> bool:
    """Whether loading ``name_or_path`` may import and run code it ships (``trust_remote_code``)."""
    return _identity(name_or_path) in _TRUSTED.get()


def _remote_code_hint(name_or_path: str, error: Exception) -> str:
    """transformers refuses a model with custom code without ``trust_remote_code``: say how to allow it."""
    if "trust_remote_code" not in str(error) or trusts_remote_code(name_or_path):
        return ""
    return (f" {name_or_path!r} ships its own Python code, which kdbench does not run unless the experiment names it: "
            f"add it to models.trust_remote_code if you trust its authors.")


@dataclass(frozen=True)
class TinyArch:
    """Width and depth of a tiny model; ``ffn`` defaults to 4 × ``width``."""

    width: int
    layers: int
    heads: int
    ffn: int | None = None


@dataclass(frozen=True)
class ModelFamily:
    """A model family: its tiny architectures (built from the family's HF config class) and its
    paper-scale checkpoints (hub names or local paths), each as a teacher and named students."""

    name: str
    description: str
    make_config: Callable[[TinyArch, int, int, int, int], PretrainedConfig]  # (arch, vocab, positions, eos, pad)
    tiny_teacher: TinyArch
    tiny_students: dict[str, TinyArch]
    paper_teacher: str
    paper_students: dict[str, str]
    # config.json fields (``model_type`` included) of the paper checkpoints, by hub name: sizes for
    # ``kdbench run --dry-run`` when a checkpoint is neither a local folder nor in the HF cache.
    paper_configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def checkpoints(self, scale: str, students: list[str] | None = None) -> tuple[str, dict[str, str]]:
        """Teacher label and student labels (→ hub names at paper scale; tiny labels name architectures)
        for ``scale``; ``students`` keeps only those labels. Without it: every paper student, and the first tiny
        one (the smallest: the rest of the tiny ladder is a size sweep, asked for by name, so adding a size to a
        family does not multiply every experiment's grid)."""
        teacher, available = ((self.paper_teacher, dict(self.paper_students)) if scale == "paper"
                              else ("teacher", {label: label for label in self.tiny_students}))
        if students is None:
            return teacher, available if scale == "paper" else dict(list(available.items())[:1])
        unknown = [s for s in students if s not in available]
        if unknown:
            raise KdbenchError(f"models.students {unknown} are not students of {self.name} at scale {scale}; "
                               f"available: {sorted(available)}.")
        return teacher, {s: available[s] for s in students}


def train_tokenizer(texts: Iterable[str], vocab_size: int, directory: Path,
                    fixed_pieces: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE trained on the suite's own text, saved as a standard HF tokenizer folder.

    ``fixed_pieces`` (the prompt template's constant parts) become single added tokens: the template
    repeated in every record then costs a few positions, so a CPU spends its time on the text the
    loss is taken on, while words and numbers keep ordinary word-level BPE.
    """
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    core.add_tokens([AddedToken(piece, normalized=False) for piece in fixed_pieces])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=None
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_model(family: ModelFamily, arch: TinyArch, tokenizer: Any, max_positions: int, seed: int,
                     directory: Path) -> None:
    """Random-init a model from the family's config class and save it (with its tokenizer) as an HF folder."""
    config = family.make_config(arch, len(tokenizer), max_positions, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with seeded(seed):
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_tokenizer(name_or_path: str) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trusts_remote_code(name_or_path))
    except (OSError, ValueError) as error:
        raise KdbenchError(
            f"could not load a tokenizer from {name_or_path!r}: {error}. Expected a local model folder or a "
            "hub name available offline (set HF_HUB_OFFLINE=0 and log in to download it)."
            + _remote_code_hint(name_or_path, error)
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 and friends ship without a pad token
    return tokenizer


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32,
               device: torch.device | None = None) -> PreTrainedModel:
    """The one loading path of every model. With ``device`` the weights go straight there (no second
    copy of a 13B teacher in CPU memory per process)."""
    placement = {"device_map": {"": device}} if device is not None and device.type != "cpu" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, use_safetensors=_safetensors_only(name_or_path),
                                                     trust_remote_code=trusts_remote_code(name_or_path), **placement)
    except (OSError, ValueError) as error:
        raise KdbenchError(
            f"could not load a model from {name_or_path!r}: {error}. Expected a local Hugging Face model folder "
            "or a hub name available offline." + _remote_code_hint(name_or_path, error)
        ) from None
    return model.to(device) if device is not None else model


def _safetensors_only(name_or_path: str) -> bool | None:
    """A local folder is read from safetensors only when it has them (kdbench writes nothing else); None lets
    transformers choose for a hub checkpoint (it prefers safetensors, and loads a ``.bin`` with ``weights_only``)."""
    path = Path(name_or_path)
    return True if path.is_dir() and any(path.glob("*.safetensors")) else None


def load_config(name_or_path: str, **kwargs: Any) -> PretrainedConfig:
    """A model's config, through the same remote-code policy as its weights."""
    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trusts_remote_code(name_or_path), **kwargs)


def check_same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any, teacher: str, student: str) -> None:
    """KD compares distributions token by token: both sides must index the same vocabulary."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        t_size, s_size = len(teacher_tokenizer), len(student_tokenizer)
        raise KdbenchError(
            f"teacher {teacher!r} ({t_size} tokens) and student {student!r} ({s_size} tokens) do not share a "
            "vocabulary, so their next-token distributions cannot be compared. Pick a student of the teacher's "
            "family, or give both the same tokenizer."
        )


def config_vocab_size(name_or_path: str) -> int:
    """The width of a checkpoint's logits (``config.vocab_size``), read from its config alone."""
    try:
        return int(load_config(name_or_path).get_text_config().vocab_size)
    except (OSError, ValueError) as error:
        raise KdbenchError(f"could not read the config of {name_or_path!r}: {error}. Expected a local Hugging Face "
                           "model folder or a hub name available offline." + _remote_code_hint(name_or_path, error)
                           ) from None


def check_same_vocab_size(teacher_size: int, student_size: int, teacher: str, student: str) -> None:
    """Token-level KD pairs logit i of the teacher with logit i of the student: both must have as many. Tokenizers
    can agree while the embedding matrices do not (one padded to a multiple of 64, or resized after adding tokens)."""
    if teacher_size != student_size:
        raise KdbenchError(
            f"teacher {teacher!r} has config.vocab_size {teacher_size} and student {student!r} has {student_size}: "
            "their logits have different widths, so token-level losses cannot pair them. Expected equal vocabulary "
            "sizes; pick a student whose embedding matrix matches the teacher's (or resize one with "
            "model.resize_token_embeddings and save it as a local folder)."
        )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_config_parameters(config: PretrainedConfig) -> int:
    """Parameters of the causal LM ``config`` describes, built on the meta device (no memory, no weights);
    tied input/output embeddings count once, as the checkpoint stores them."""
    # Every tensor created on the meta device: even the first allocation inside a layer's __init__ takes no
    # memory, so a config with absurd sizes (a mistyped max_length) is counted instead of exhausting RAM.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # transformers 5 leaves lm_head with a meta tensor of its own here; tying again makes it the embedding's
    # Parameter, so parameters() (which skips repeats) counts it once.
    model.tie_weights()
    return sum(parameter.numel() for parameter in model.parameters())
