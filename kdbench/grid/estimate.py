"""Estimates for a plan, from settings alone: model sizes, per-GPU memory, data sizes.

Nothing here loads weights or tokenizers, trains or generates. Model sizes come from configs alone:
a local model folder's ``config.json``, a hub checkpoint's config when it is in the local Hugging Face
cache, else the family's built-in table of paper checkpoints (``ModelFamily.paper_configs``), and at
tiny scale the family's ``make_config``. Every config is turned into a model on the meta device
(no memory) and its parameters are counted. Data sizes come from the dataset's registry entry: its
``load`` when that works offline, else the sizes it documents (marked as estimates).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from kdbench.config import DataConfig
from kdbench.data import TEMPLATE_PIECES, DatasetSpec
from kdbench.errors import KdbenchError
from kdbench.zoo import ModelFamily, TinyArch, count_config_parameters, load_config

GIB = 2**30
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Bytes per parameter of (weights, gradients, Adam optimizer state): ZeRO's 2Ψ + 2Ψ + KΨ with K = 12 in
# mixed precision (fp32 master weights + two fp32 moments); in fp32 the weights are their own master copy.
STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}
# The ids train_tokenizer gives its special tokens (EOS first, PAD second); they do not change any size.
TINY_EOS_ID, TINY_PAD_ID = 0, 1


# -- model sizes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSize:
    """A model's parameter count and the shape numbers the activation estimate needs."""

    params: int
    hidden: int
    layers: int
    heads: int
    vocab: int
    source: str  # where the config came from: local folder, HF cache, built-in table, tiny architecture


def size_of_config(config: PretrainedConfig, source: str) -> ModelSize:
    """The ``ModelSize`` of ``config``; hidden/layers/heads/vocab through the config's standard aliases."""
    text = config.get_text_config()
    return ModelSize(count_config_parameters(config), int(text.hidden_size), int(text.num_hidden_layers),
                     int(text.num_attention_heads), int(text.vocab_size), source)


def paper_model_size(name_or_path: str, family: ModelFamily) -> ModelSize:
    """The size of a paper-scale checkpoint, without touching the network or any weights: a local model
    folder's config, else the hub config if it is in the local HF cache, else ``family.paper_configs``."""
    if Path(name_or_path).is_dir():  # from_pretrained would take the folder too, so the plan does the same
        try:
            return size_of_config(load_config(name_or_path), "local folder")
        except (OSError, ValueError) as error:
            raise KdbenchError(f"{name_or_path} is a folder but holds no readable model config: {error}") from None
    try:
        return size_of_config(load_config(name_or_path, local_files_only=True), "HF cache")
    except (OSError, ValueError):
        pass  # not cached here: the built-in table below
    fields = dict(family.paper_configs.get(name_or_path) or {})
    if not fields:
        raise KdbenchError(f"no config for {name_or_path!r}: it is not a local folder, not in the HF cache and not in "
                           f"the {family.name} family's table ({sorted(family.paper_configs) or 'empty'}).")
    return size_of_config(AutoConfig.for_model(fields.pop("model_type"), **fields), "built-in table")


def tiny_model_size(family: ModelFamily, arch: TinyArch, data: DataConfig) -> ModelSize:
    """The size of a tiny model as the runner builds it: the family's config class, the BPE vocabulary plus
    one added token per constant template piece, and ``max_length`` positions."""
    vocab = data.tokenizer_vocab_size + len(TEMPLATE_PIECES)
    config = family.make_config(arch, vocab, data.max_length, TINY_EOS_ID, TINY_PAD_ID)
    return size_of_config(config, "tiny architecture")


# -- memory ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU while training one model."""

    weights: int
    gradients: int
    optimizer: int
    teacher: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.teacher + self.activations


def _shard(nbytes: int, gpus: int, sharded: bool) -> int:
    return -(-nbytes // gpus) if sharded else nbytes  # ceil: the largest shard


def estimate_memory(params: int, precision: str, zero_stage: int, gpus: int, teacher_params: int = 0,
                    activations: int = 0, teacher_precision: str | None = None) -> MemoryEstimate:
    """Per-GPU memory of training ``params`` parameters with Adam, after ZeRO (Rajbhandari et al. 2020,
    "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", §3 and Fig. 1).

    With Ψ = ``params`` and N = ``gpus``:

    * bf16 / fp16 (mixed precision): weights 2Ψ, gradients 2Ψ, optimizer state 12Ψ (an fp32 master copy
      of the weights and Adam's two fp32 moments, 4Ψ each);
    * fp32: weights 4Ψ, gradients 4Ψ, optimizer state 8Ψ (the two moments).

    ZeRO stage 0 replicates all three on every GPU; stage 1 divides the optimizer state by N, stage 2 also
    the gradients, stage 3 also the weights. A frozen teacher adds its weights only, whole on every GPU,
    in ``teacher_precision`` (default: ``precision``): 2Ψ_T or 4Ψ_T. ``activations`` (bytes, see
    ``estimate_activations``) is added as given. Not counted: DeepSpeed's communication buckets, the CUDA
    context, allocator fragmentation and temporary buffers.
    """
    if precision not in STATE_BYTES:
        raise ValueError(f"precision must be one of {sorted(STATE_BYTES)}, got {precision!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    weight_bytes, gradient_bytes, optimizer_bytes = STATE_BYTES[precision]
    return MemoryEstimate(
        weights=_shard(weight_bytes * params, gpus, zero_stage >= 3),
        gradients=_shard(gradient_bytes * params, gpus, zero_stage >= 2),
        optimizer=_shard(optimizer_bytes * params, gpus, zero_stage >= 1),
        teacher=PRECISION_BYTES[teacher_precision or precision] * teacher_params,
        activations=activations,
    )


def estimate_activations(size: ModelSize, batch_size: int, seq_len: int, precision: str,
                         checkpointing: bool = False, sequences: int = 1, fused_head: bool = False) -> int:
    """An *estimate* of the activation bytes one GPU keeps for backward over a micro-batch of ``batch_size``
    sequences of ``seq_len`` tokens, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in
    Large Transformer Models", §4), with s = ``seq_len``, b = ``batch_size``, h, a, L, v the model's width,
    heads, layers and vocabulary:

    * per layer, 16-bit, no recomputation: s·b·h·(34 + 5·a·s/h) bytes (attention scores included, as
      without flash attention); with gradient checkpointing only each layer's input, 2·s·b·h;
    * the output layer (their §4.3): final layer norm and vocabulary projection input, 2·s·b·h each, and
      the fp32 logits of the loss, 4·s·b·v (none with ``fused_head``: the losses make a piece at a time);
    * fp32 training doubles the 16-bit terms (approximation: the 1-byte dropout masks do not double);
    * times ``sequences``: the sequences per prompt the student runs with gradients in one micro-batch
      (gold, plus teacher text, a fresh sample or a rollout), all kept until the one backward pass.

    Every sequence is taken at full length; padding to the batch's longest makes that an upper bound per
    batch. Not counted: the transient recomputation of one layer in backward, the teacher's logits, the
    objective's extra fp32 (b, s, v) tensors, and the KV cache of sampling.
    """
    s, b, h, a, v = seq_len, batch_size, size.hidden, size.heads, size.vocab
    scale = PRECISION_BYTES[precision] // 2  # 1 for 16-bit, 2 for fp32
    per_layer = 2 * s * b * h if checkpointing else 34 * s * b * h + 5 * a * s * s * b  # = s·b·h·(34 + 5as/h)
    output_layer = 4 * s * b * h * scale + (0 if fused_head else 4 * s * b * v)
    return sequences * (size.layers * per_layer * scale + output_layer)


# -- data -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitSizes:
    """Records per split of a dataset as planned with, and how they were found."""

    sizes: dict[str, int] | None  # None: unknown
    estimated: bool  # documented sizes, not counted
    how: str

    def get(self, split: str) -> int | None:
        return None if self.sizes is None else self.sizes.get(split)


def dataset_sizes(spec: DatasetSpec, options: dict[str, Any]) -> SplitSizes:
    """Count the records of every split through the registry's ``load``; when that cannot run (data not
    available offline), fall back to the sizes the dataset documents."""
    try:
        splits = spec.load(dict(options))
    except KdbenchError as error:
        if spec.documented_sizes is None:
            return SplitSizes(None, False, f"unknown: {spec.name} could not be loaded and documents no sizes ({error})")
        return SplitSizes(dict(spec.documented_sizes(dict(options))), True,
                          f"documented sizes of {spec.name} (estimate; it could not be loaded: {error})")
    except Exception as error:  # noqa: BLE001  (a loader failing on the options it was given: the user's to fix)
        raise KdbenchError(f"dataset {spec.name!r} failed to load with options {options}: {type(error).__name__}: "
                           f"{error}. Check the options (expected some of {list(spec.option_names)}).") from None
    return SplitSizes({name: len(records) for name, records in splits.items()}, False, f"counted from {spec.name}")


# -- disk -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiskEstimate:
    """Bytes a stage leaves written (``kept``), and those it needs only while it runs (``transient``: a training
    stage's resume checkpoint, removed once it finishes)."""

    kept: int
    transient: int = 0


def trained_model_disk(params: int, precision: str) -> DiskEstimate:
    """A trained model: its weights in the training precision; meanwhile a resume checkpoint of its weights and
    optimizer state (the gradients are not saved)."""
    weights, _, optimizer = STATE_BYTES[precision]
    return DiskEstimate(PRECISION_BYTES[precision] * params, (weights + optimizer) * params)


def teacher_outputs_disk(tokens: int, vocab: int, top_k: int | None) -> DiskEstimate:
    """Stored teacher distributions: fp32 over the vocabulary for every response token, or the top k as
    (id, log-probability) pairs of 4 bytes each (``kdbench.train.teacher_outputs``)."""
    return DiskEstimate(tokens * (vocab * 4 if top_k is None else top_k * 8))


def tokens_disk(sequences: int, length: int) -> DiskEstimate:
    """Token ids (int64) of ``sequences`` sequences of at most ``length`` tokens: tokenised data, generations."""
    return DiskEstimate(sequences * length * 8)


# A cell's folder: its scores per prompt and evaluation seed (examples.json, about 10 bytes each in the tiny
# reference), and its result, config, training log and sampled responses (40-120 KB there), with room to spare.
EVAL_BYTES_PER_GENERATION = 16
EVAL_BYTES_PER_CELL = 256 * 1024
