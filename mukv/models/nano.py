"""The nano model: a small LLaVA-OneVision trained on the synthetic benchmark and shipped with the package.

Architecture is transformers' own ``LlavaOnevisionForConditionalGeneration`` (SigLIP vision tower, 2-layer
projector, 2x bilinear pooling, Qwen2 text model) with small dimensions: 112 px frames, patch 14 -> 8x8
patches -> 4x4 = **16 visual tokens per frame**, one token per cell of the benchmark's 4x4 grid. The
tokenizer is word level over the benchmark's words plus the Qwen2 chat tokens (unknown words map to
``[UNK]``), built here, no download.

The trained checkpoint lives in ``mukv/assets/nano/`` (``model.safetensors``, ``config.json``, tokenizer
files, ``mukv_nano.json`` with the image statistics and the training record). ``make train-nano``
(``python -m mukv_nano.train``, the recipe in the ``mukv_nano`` package) retrains it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from mukv.data.synthetic import COLOUR_NAMES, DIRECTIONS, GRID, SHAPES
from mukv.errors import ConfigError
from mukv.models.tokenizer import CHAT_SPECIAL_TOKENS

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "nano"
META_FILE = "mukv_nano.json"
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

# Every word of the init prompt, the question template, the benchmark's questions and answers.
_WORDS = (
    "system you are a helpful assistant user . , ? ! : ' "
    "what colour color was the how many have appeared so far shape is at row column now "
    "which came first or way did move moved rings balls stars crosses diamonds circles squares triangles "
    "in of to and it there were times after before cell counting from top left right up down bottom "
    "yes no not"
).split()


def cell_words() -> list[str]:
    """The grid's "row r" / "column c" phrases, each one token with ``build_word_tokenizer(cell_words=True)``."""
    return [f"row {r + 1}" for r in range(GRID)] + [f"column {c + 1}" for c in range(GRID)]


def cell_word_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of "row 1" .. "row 4" and of "column 1" .. "column 4" in a cell-word tokenizer."""
    ids = tokenizer.convert_tokens_to_ids(cell_words())
    return ids[:GRID], ids[GRID:]


def nano_vocabulary(with_cell_words: bool = False) -> list[str]:
    """Word list (order fixed: the checkpoint's embedding rows follow it)."""
    words = ["[UNK]", *_WORDS, *COLOUR_NAMES, *SHAPES, *DIRECTIONS, *[str(i) for i in range(10)]]
    if with_cell_words:
        words += cell_words()
    return list(dict.fromkeys(w.lower() for w in words))


def build_word_tokenizer(with_cell_words: bool = False) -> PreTrainedTokenizerFast:
    """Lower-cased word-level tokenizer (punctuation split off) followed by the chat special tokens.

    ``with_cell_words``: "row 2" and "column 3" are single tokens (a merge, as a BPE vocabulary has). With the
    words apart, the nano model never learned to carry the digit after "row" to the answer position (a linear
    probe there finds the asked cell in 8% of questions at every layer, chance 6%): "What shape is at row r
    column c now?" stayed at chance (BENCHMARKS.md section 1)."""
    vocab = {w: i for i, w in enumerate(nano_vocabulary(with_cell_words))}
    # The word list is lower-cased, so row 0 is "[unk]": unknown words map to it. (The special "[UNK]" that
    # PreTrainedTokenizerFast registers as unk_token got an id of its own in the shipped checkpoint; ids are
    # frozen by the checkpoint's embedding rows, so both stay.)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[unk]"))
    tok.normalizer = normalizers.Lowercase()
    if with_cell_words:  # pieces: "row 2" / "column 3" of the grid, words, punctuation runs (as Whitespace)
        cell = rf"(?:row|column) [1-{GRID}](?!\d)"
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(rf"{cell}|\w+|[^\w\s]+"), behavior="removed", invert=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=CHAT_SPECIAL_TOKENS[1:],
    )


# Dimensions of a nano model built from scratch (train.text_heads / text_kv_heads override the heads); a
# checkpoint's config.json holds the ones it was trained with.
NANO_DIMS = dict(image_size=112, vision_hidden=96, vision_layers=2, vision_heads=4, text_hidden=192,
                 text_layers=4, text_heads=8, text_kv_heads=4, text_intermediate=512, rope_theta=10000.0)


def nano_config(vocab_size: int, image_size: int = 112, vision_hidden: int = 96, vision_layers: int = 2,
                vision_heads: int = 4, text_hidden: int = 192, text_layers: int = 4, text_heads: int = 4,
                text_kv_heads: int = 2, text_intermediate: int = 512, rope_theta: float = 10000.0,
                max_positions: int = 1 << 20) -> LlavaOnevisionConfig:
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=image_size, patch_size=14,
    )
    text = Qwen2Config(
        vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=text_intermediate,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_kv_heads,
        max_position_embeddings=max_positions, rope_theta=rope_theta, tie_word_embeddings=True,
    )
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_token_index=vocab_size - 1,
        video_token_index=vocab_size - 2, tie_word_embeddings=True,
    )


def build_nano(seed: int = 0, with_cell_words: bool = False,
               **dims) -> tuple[LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast]:
    """A freshly initialised nano model (for training) and its tokenizer."""
    tokenizer = build_word_tokenizer(with_cell_words)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(nano_config(len(tokenizer), **{**NANO_DIMS, **dims}))
    return model, tokenizer


def save_nano(model, tokenizer, out_dir: str | Path, record: dict | None = None) -> Path:
    """Write a loadable checkpoint folder: safetensors + config + tokenizer + image statistics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {"image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD), "tokens_per_frame": 16,
            **(record or {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return out


def nano_dir(path: str | None) -> Path:
    return Path(path).expanduser() if path else ASSET_DIR


def _checkpoint_folder(path: str | Path | None, field: str) -> Path:
    folder = nano_dir(str(path) if path else None)
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise ConfigError(field, f"no nano checkpoint (model.safetensors + config.json) in {folder} "
                                 "(train one: make train-nano)")
    return folder


def read_nano_config(path: str | Path | None, field: str = "model.path") -> LlavaOnevisionConfig:
    """The config of a nano checkpoint folder (None: the shipped one), read without its weights."""
    return LlavaOnevisionConfig.from_pretrained(str(_checkpoint_folder(path, field)))


def load_nano_checkpoint(path: str | Path | None, dtype: torch.dtype = torch.float32,
                         field: str = "model.path") -> tuple[LlavaOnevisionForConditionalGeneration,
                                                             PreTrainedTokenizerFast]:
    """(model, tokenizer) of a nano checkpoint folder (None: the shipped one); a folder without one is a
    ``ConfigError`` naming ``field``."""
    folder = _checkpoint_folder(path, field)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    return LlavaOnevisionForConditionalGeneration.from_pretrained(str(folder), dtype=dtype), tokenizer


def trained_video_frames(meta: dict) -> int | None:
    """The most frames a training stream held (the recipe's ``max_frames``; flat or nested settings)."""
    settings = meta.get("settings") or {}
    frames = settings.get("max_frames", (settings.get("curriculum") or {}).get("max_frames"))
    return int(frames) if frames else None


def read_meta(path: str | Path) -> dict:
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
