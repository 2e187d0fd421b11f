"""A tokenizer built locally (no download): byte-level BPE without merges plus the Qwen2 chat tokens.

Any text tokenizes (every byte is a token), so the tiny model can read real RVS questions, and the chat
template of the published code (``<|im_start|>`` / ``<|im_end|>``) keeps its special tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<video>", "<image>"]


def build_byte_tokenizer(extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """256 byte tokens followed by the chat special tokens (then ``extra_special``); ``<|im_end|>`` ends an
    answer."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[*CHAT_SPECIAL_TOKENS[1:], *extra_special],
    )
