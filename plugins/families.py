"""Model families GPT-2 and OPT: tiny architectures from their HF config classes, and the papers'
checkpoints (MiniLLM / DPKD: GPT-2 1.5B → 120M/340M/760M, OPT 13B → 1.3B/2.7B/6.7B)."""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config, OPTConfig, PretrainedConfig

from kdbench import hookimpl
from kdbench.zoo import ModelFamily, TinyArch

# The papers' ladder in miniature (experiments/tiny.md): a teacher about 15× the smaller student (GPT-2 1.5B : 120M
# is 12.5×) and 7× the larger one (1.5B : 340M is 4.4×). With the suite's 1,028-token vocabulary and 120 positions:
# teacher 0.94M parameters, s1 62k, s2 140k. Neither student can hold every member of every category; s1 does
# not learn to reverse a list (experiments/tiny.md, calibration item 6).
TINY_TEACHER = TinyArch(width=128, layers=4, heads=4)
TINY_STUDENTS = {"s1": TinyArch(width=32, layers=2, heads=2), "s2": TinyArch(width=48, layers=3, heads=4)}


def gpt2_config(arch: TinyArch, vocab: int, positions: int, eos: int, pad: int) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=arch.width, n_layer=arch.layers, n_head=arch.heads,
        n_inner=arch.ffn, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def opt_config(arch: TinyArch, vocab: int, positions: int, eos: int, pad: int) -> PretrainedConfig:
    return OPTConfig(
        vocab_size=vocab, max_position_embeddings=positions, hidden_size=arch.width,
        word_embed_proj_dim=arch.width, num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
        ffn_dim=arch.ffn or 4 * arch.width, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
        dropout=0.0, attention_dropout=0.0, do_layer_norm_before=True,
    )


def gpt2_paper(width: int, layers: int, heads: int) -> dict[str, Any]:
    """config.json fields of an OpenAI GPT-2 checkpoint (vocabulary 50257, 1024 positions, FFN 4 × width)."""
    return {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": width, "n_layer": layers,
            "n_head": heads}


def opt_paper(hidden: int, layers: int, heads: int, ffn: int) -> dict[str, Any]:
    """config.json fields of a Meta OPT checkpoint (vocabulary 50272, 2048 positions, no embedding projection)."""
    return {"model_type": "opt", "vocab_size": 50272, "max_position_embeddings": 2048, "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "ffn_dim": ffn, "word_embed_proj_dim": hidden,
            "do_layer_norm_before": True}


# Published sizes (tied input/output embeddings counted once): gpt2 124,439,808; gpt2-medium 354,823,168;
# gpt2-large 774,030,080; gpt2-xl 1,557,611,200; opt-1.3b 1,315,758,080; opt-13b 12,853,473,280.
GPT2_PAPER_CONFIGS = {
    "gpt2": gpt2_paper(768, 12, 12),
    "gpt2-medium": gpt2_paper(1024, 24, 16),
    "gpt2-large": gpt2_paper(1280, 36, 20),
    "gpt2-xl": gpt2_paper(1600, 48, 25),
}
OPT_PAPER_CONFIGS = {
    "facebook/opt-1.3b": opt_paper(2048, 24, 32, 8192),
    "facebook/opt-2.7b": opt_paper(2560, 32, 32, 10240),
    "facebook/opt-6.7b": opt_paper(4096, 32, 32, 16384),
    "facebook/opt-13b": opt_paper(5120, 40, 40, 20480),
}

GPT2 = ModelFamily(
    name="gpt2",
    description="GPT-2 (learned positions, GELU MLP, tied embeddings)",
    make_config=gpt2_config,
    tiny_teacher=TINY_TEACHER,
    tiny_students=TINY_STUDENTS,
    paper_teacher="gpt2-xl",
    paper_students={"120M": "gpt2", "340M": "gpt2-medium", "760M": "gpt2-large"},
    paper_configs=GPT2_PAPER_CONFIGS,
)

OPT = ModelFamily(
    name="opt",
    description="OPT (pre-LayerNorm decoder, ReLU MLP, offset learned positions)",
    make_config=opt_config,
    tiny_teacher=TINY_TEACHER,
    tiny_students=TINY_STUDENTS,
    paper_teacher="facebook/opt-13b",
    paper_students={"1.3B": "facebook/opt-1.3b", "2.7B": "facebook/opt-2.7b", "6.7B": "facebook/opt-6.7b"},
    paper_configs=OPT_PAPER_CONFIGS,
)


@hookimpl
def kdbench_register_model_families() -> list[ModelFamily]:
    return [GPT2, OPT]
