"""Qwen2.5-VL and Qwen3-VL behind the ``VideoLLM`` surface: every cache method runs on them unchanged.

What differs from LLaVA-OneVision, and how it is handled here (and nowhere else):

* **Two frames per temporal patch.** The vision tower embeds ``temporal_patch_size`` (2) frames at once: one
  *step* of the stream is a pair of frames, and a step's ``tokens_per_frame`` tokens are what the cache methods
  call a frame (``KVGeometry.frames_per_step`` says how many video frames that is; the engine encodes whole
  steps and reports recalls in video frames).
* **Multimodal RoPE.** Queries and keys rotate by a 3-D position (time, height, width sections of the head
  dimension; Qwen3-VL interleaves the sections). Cache methods keep choosing one position ``p`` per token, as
  for every model; this adapter says what ``p`` means in 3-D. A text token at ``p`` sits at ``(p, p, p)``; the
  token in row ``r``, column ``c`` of a frame whose ``N`` tokens sit at ``b .. b + N - 1`` sits at
  ``(b, b + r, b + c)``: the frame's time is its first position and its grid is anchored there, the layout of
  one Qwen3-VL frame. Since ``(b, b + r, b + c) = p + (-j, r - j, c - j)`` with ``j = r * W + c`` (the token's
  slot, ``p = b + j``), the language model's own rotary embedding rotates q and k by the per-token offset
  ``(-j, r - j, c - j)`` (a position id the stock model takes), and the cache methods rotate by ``p`` on top, as
  they do for LLaVA-OV. Moving a whole frame (re-indexing to contiguous positions) moves its time and its grid
  together; tokens a method places elsewhere keep their offset from where they are put.
* **Side channels.** A visual token is its embedding followed by three channels ``(1, r, c)`` (text tokens:
  zeros) and, for Qwen3-VL, its deepstack features (added by the language model to the hidden states of its
  first layers). Packed along the feature dimension, they travel with the token through every method's
  selection, concatenation and averaging; ``forward`` unpacks them. ``token_features`` is the embedding alone.
* **Frames** are resized to ``frame_size`` (PIL bicubic on uint8, as the checkpoint's processor) and cut into the
  vision tower's flat patch layout here (no torchvision); ``check_frame_size`` refuses a size the patch grid
  does not divide, before any model loads.

The stock layout differs in two ways, both stated in the README: a frame advances the position by its token
count ``N`` (Qwen3-VL: by ``max(rows, cols)``, with a timestamp text before each frame; Qwen2.5-VL: all frames of a
video share one grid anchor and their times are spaced by ``tokens_per_second`` x seconds per step).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mukv.errors import ConfigError
from mukv.models import attention_hook
from mukv.models.adapter import KVGeometry, VideoLLM
from mukv.models.loading import (
    ModelLoader,
    PretrainedModel,
    _from_pretrained,
    _value,
    resolve_attn_implementation,
    resolve_device,
    resolve_dtype,
    use_stream_attention,
)
from mukv.video.preprocess import resize_frames_to

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
# The checkpoints' processor statistics (OpenAI CLIP's for Qwen2.5-VL, 0.5 for Qwen3-VL).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
IMAGE_STATS = {"qwen2_5_vl": (CLIP_MEAN, CLIP_STD), "qwen3_vl": (HALF, HALF)}
# The chat template around a streamed video: the system turn and the user turn up to the video (the init prompt,
# the attention sink), then the question after it and the assistant turn (the first answer token follows it).
QWEN_INIT_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
QWEN_QUESTION_TEMPLATE = "<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
SIDE_CHANNELS = 3  # (is visual, row, column)
QWEN_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>")


def _classes(family: str):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    if family == "qwen2_5_vl":
        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    if family == "qwen3_vl":
        return Qwen3VLConfig, Qwen3VLForConditionalGeneration
    raise ConfigError("model.family", f"unknown family '{family}'; choose one of {', '.join(FAMILIES)}")


def family_of(config) -> str:
    kind = getattr(config, "model_type", "")
    if kind == "qwen2_5_vl":
        return "qwen2_5_vl"
    if kind in ("qwen3_vl", "qwen3_vl_moe"):
        return "qwen3_vl"
    raise ConfigError("model.path", f"not a Qwen2.5-VL or Qwen3-VL checkpoint (model_type '{kind}')")


def grid_factor(config) -> int:
    """Pixels per LLM token along each side: patch size x spatial merge."""
    vision = config.vision_config
    return vision.patch_size * vision.spatial_merge_size


def check_frame_size(frame_size: Sequence[int] | None, config) -> tuple[int, int]:
    """``model.frame_size`` as (height, width), refused with the field named unless both are positive multiples of
    the model's patch grid (patch size x merge)."""
    factor = grid_factor(config)
    if frame_size is None or len(frame_size) != 2:
        raise ConfigError("model.frame_size", f"give [height, width] in pixels, multiples of {factor}; got {frame_size}")
    h, w = (int(x) for x in frame_size)
    if h <= 0 or w <= 0 or h % factor or w % factor:
        raise ConfigError("model.frame_size", f"[{h}, {w}] is not a multiple of {factor} (patch "
                                              f"{config.vision_config.patch_size} x merge "
                                              f"{config.vision_config.spatial_merge_size}) on both sides")
    return h, w


def qwen_geometry(config, dtype: torch.dtype, frame_size: Sequence[int]) -> KVGeometry:
    """KV geometry of a Qwen-VL config at ``frame_size``: tokens per step = (H / f) x (W / f)."""
    h, w = check_frame_size(frame_size, config)
    text, factor = config.text_config, grid_factor(config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return KVGeometry(num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
                      num_kv_heads=text.num_key_value_heads, head_dim=head_dim, hidden_size=text.hidden_size,
                      tokens_per_frame=(h // factor) * (w // factor),
                      dtype_bytes=torch.empty((), dtype=dtype).element_size(),
                      frames_per_step=config.vision_config.temporal_patch_size, grid=(h // factor, w // factor))


# ------------------------------------------------------------------------------------------------ configs
def qwen_tiny_config(family: str, vocab_size: int, text_layers: int = 2, hidden: int = 64, heads: int = 4,
                     kv_heads: int = 2, vision_hidden: int = 32, vision_layers: int = 2,
                     max_positions: int = 1 << 20, **_: Any):
    """A Qwen2.5-VL / Qwen3-VL config of tiny dimensions (the real architecture, random weights)."""
    config_cls, _ = _classes(family)
    head_dim = hidden // heads
    # M-RoPE sections in units of the head dimension's halves, proportioned as the released models' (1 : 1.5 : 1.5
    # for Qwen2.5-VL's [16, 24, 24] of 64; Qwen3-VL's [24, 20, 20] of 64)
    half = head_dim // 2
    if family == "qwen2_5_vl":
        t = half // 4
        section = [t, (half - t) // 2, half - t - (half - t) // 2]
        vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=2, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=56, fullatt_block_indexes=[vision_layers - 1], tokens_per_second=2)
        rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section}
        special = {}
    else:
        t = half - 2 * (half * 5 // 16)
        section = [t, half * 5 // 16, half * 5 // 16]
        vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=2, out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=64, deepstack_visual_indexes=list(range(min(2, vision_layers))))
        rope = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": section, "mrope_interleaved": True}
        special = {}
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                max_position_embeddings=max_positions, rope_parameters=rope, tie_word_embeddings=True)
    return config_cls(text_config=text, vision_config=vision, image_token_id=vocab_size - 1,
                      video_token_id=vocab_size - 2, vision_start_token_id=vocab_size - 3,
                      vision_end_token_id=vocab_size - 4, tie_word_embeddings=True, **special)


def _rope_25() -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}


def _rope_3() -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}


# Released dimensions (config.json of each checkpoint), for geometry and benchmarks with random weights.
RELEASED = {
    "qwen2.5-vl-3b": ("qwen2_5_vl", dict(
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                  rope_parameters=_rope_25(),
                  tie_word_embeddings=True),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2))),
    "qwen2.5-vl-7b": ("qwen2_5_vl", dict(
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                  rope_parameters=_rope_25()),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2))),
    "qwen3-vl-2b": ("qwen3_vl", dict(
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rope_parameters=_rope_3(), tie_word_embeddings=True),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    deepstack_visual_indexes=[5, 11, 17]))),
    "qwen3-vl-4b": ("qwen3_vl", dict(
        text=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rope_parameters=_rope_3(), tie_word_embeddings=True),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                    deepstack_visual_indexes=[5, 11, 17]))),
    "qwen3-vl-8b": ("qwen3_vl", dict(
        text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rope_parameters=_rope_3()),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                    deepstack_visual_indexes=[8, 16, 24]))),
}


def released_config(name: str):
    """The architecture of a released Qwen-VL checkpoint (no weights)."""
    if name not in RELEASED:
        raise ValueError(f"unknown Qwen-VL size '{name}'; choose one of {', '.join(RELEASED)}")
    family, dims = RELEASED[name]
    config_cls, _ = _classes(family)
    ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    return config_cls(text_config=dims["text"], vision_config=dims["vision"], **ids,
                      tie_word_embeddings=dims["text"].get("tie_word_embeddings", False))


# ---------------------------------------------------------------------------------------------- frames
def frame_patches(frames: np.ndarray, frame_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                  patch: int, merge: int, temporal: int) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float32 (n / temporal x gh x gw, 3 x temporal x patch x patch): resized to
    ``frame_size`` (PIL bicubic on uint8), ``x / 255``, normalised, and cut into the vision tower's flat layout
    (steps, then merge windows row by row, then the patches of a window; per patch: channel, frame, pixels), as
    the checkpoints' processors lay out a video."""
    h, w = frame_size
    if len(frames) % temporal:
        raise ValueError(f"{len(frames)} frames do not make whole steps of {temporal}")
    x = torch.from_numpy(np.ascontiguousarray(resize_frames_to(frames, h, w))).permute(0, 3, 1, 2).float()
    m = torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1)
    x = x.div_(255.0).sub_(m).div_(s)
    gh, gw = h // patch, w // patch
    x = x.reshape(len(frames) // temporal, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(-1, 3 * temporal * patch * patch)


# ------------------------------------------------------------------------------------------------ model
class QwenVLVideoLLM(VideoLLM):
    """A Qwen2.5-VL or Qwen3-VL model as a ``VideoLLM`` (see the module docstring for the position rule)."""

    positions_at_zero = False  # the model rotates by each token's in-frame offsets (``rope_offsets``)

    def __init__(self, model, tokenizer, frame_size: Sequence[int], name: str = "qwen-vl",
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None) -> None:
        self.family = family_of(model.config)
        self.frame_size = check_frame_size(frame_size, model.config)
        mean, std = IMAGE_STATS[self.family]
        super().__init__(model, tokenizer, image_mean or mean, image_std or std, init_prompt=QWEN_INIT_PROMPT,
                         question_template=QWEN_QUESTION_TEMPLATE, name=name)
        vision = model.config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.deepstack = len(getattr(vision, "deepstack_visual_indexes", None) or ())
        self.hidden = self.geometry.hidden_size
        rows, cols = self.geometry.grid
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        # (N, 3): the side channels of a frame's tokens, in the order the vision tower emits them
        self._frame_codes = torch.stack((torch.ones(rows * cols), r.flatten().float(), c.flatten().float()), dim=-1)

    def make_geometry(self, config, dtype: torch.dtype) -> KVGeometry:
        return qwen_geometry(config, dtype, self.frame_size)

    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def vision_tower(self):
        return self.model.model.visual

    @property
    def packed_width(self) -> int:
        """Channels of a packed token: embedding, side channels, deepstack features."""
        return self.hidden * (1 + self.deepstack) + SIDE_CHANNELS

    def token_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[..., : self.hidden]

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        x = frame_patches(frames, self.frame_size, self.image_mean, self.image_std, self.patch, self.merge,
                          self.temporal)
        return x.to(self.device, self.dtype)

    def vision_inputs(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel patches, grid_thw) of ``frames`` as one video, as the stock model takes them."""
        rows, cols = self.geometry.grid
        grid = torch.tensor([[len(frames) // self.temporal, rows * self.merge, cols * self.merge]], device=self.device)
        return self.preprocess(frames), grid

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """Packed visual tokens of each step of ``frames`` (a whole number of steps): (steps, N, packed_width)."""
        pixels, grid = self.vision_inputs(frames)
        out = self.model.model.get_video_features(pixels, grid, return_dict=True)
        feats = torch.cat(out.pooler_output, dim=0)
        steps, n, d = int(grid[0, 0]), self.geometry.tokens_per_frame, self.hidden
        tokens = self.visual_tokens(feats.view(steps, n, -1))
        for i, level in enumerate((getattr(out, "deepstack_features", None) or [])[: self.deepstack]):
            start = d * (1 + i) + SIDE_CHANNELS
            tokens[..., start: start + d] = torch.cat(level, dim=0).view(steps, n, -1)
        return tokens

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Packed tokens of whole steps from their embeddings (steps, N, hidden): side channels of the frame
        grid, zero deepstack features."""
        codes = self._frame_codes.to(features.device, features.dtype).expand(features.shape[0], -1, -1)
        zeros = features.new_zeros(*features.shape[:2], self.hidden * self.deepstack)
        return torch.cat((features, codes, zeros), dim=-1)

    def embed_ids(self, ids) -> torch.Tensor:
        emb = super().embed_ids(ids)
        pad = self.packed_width - emb.shape[-1]
        return torch.nn.functional.pad(emb, (0, pad))

    def rope_offsets(self, packed: torch.Tensor) -> torch.Tensor:
        """(3, B, L) per-token offsets from the side channels: ``(-j, r - j, c - j)`` for a visual token in row
        ``r``, column ``c`` (slot ``j = r x cols + c``), zeros for text."""
        code = packed[..., self.hidden: self.hidden + SIDE_CHANNELS].float()
        visual, r, c = code.unbind(-1)
        j = r * self.geometry.grid[1] + c
        return torch.stack((-j, r - j, c - j)) * visual

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, attention, num_layers: int | None = None) -> torch.Tensor:
        from mukv.cache.instrumentation import OpCounter

        OpCounter.add_forward(embeds)
        if embeds.shape[-1] != self.packed_width:
            raise ValueError(f"expected packed tokens of width {self.packed_width} (embed_ids / encode_frames), "
                             f"got {embeds.shape[-1]}")
        kwargs: dict[str, Any] = {}
        if self.deepstack:  # added at every token (zeros at text): no host wait to find the visual ones
            d = self.hidden
            kwargs["visual_pos_masks"] = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            kwargs["deepstack_visual_embeds"] = [
                embeds[..., d * (1 + i) + SIDE_CHANNELS: d * (2 + i) + SIDE_CHANNELS].reshape(-1, d).to(self.dtype)
                for i in range(self.deepstack)]
        with self.attention_kwargs(attention) as handed, self.first_layers(num_layers):
            out = self.language_model(
                inputs_embeds=embeds[..., : self.hidden].to(self.dtype), position_ids=self.rope_offsets(embeds),
                use_cache=False, attention_mask=attention_hook.handled_mask(embeds.device), **handed, **kwargs)
        return out.last_hidden_state


# ---------------------------------------------------------------------------------------------- loaders
def build_qwen_tiny(family: str, frame_size: Sequence[int], seed: int, device: torch.device, dtype: torch.dtype,
                    **dims) -> QwenVLVideoLLM:
    """A seeded, random-initialised tiny Qwen-VL model with the locally built tokenizer (no download)."""
    tokenizer = build_qwen_tokenizer()
    config = qwen_tiny_config(family, len(tokenizer), **dims)
    _, model_cls = _classes(family)
    torch.manual_seed(seed)
    model = model_cls(config).to(device=device, dtype=dtype)
    use_stream_attention(model)
    return QwenVLVideoLLM(model, tokenizer, frame_size, name=f"{family}-tiny")


def build_qwen_tokenizer():
    """The byte tokenizer with Qwen-VL's vision markers as special tokens."""
    from mukv.models.tokenizer import build_byte_tokenizer

    return build_byte_tokenizer(QWEN_SPECIAL_TOKENS)


def load_qwen_pretrained(path: str, frame_size: Sequence[int], device: torch.device, dtype: torch.dtype,
                         attn_implementation: str) -> QwenVLVideoLLM:
    """Weights, tokenizer and image statistics of a Qwen2.5-VL / Qwen3-VL checkpoint (Hub id or folder). The
    checkpoint's processor classes need torchvision (their video processors), so the statistics are read from
    its processor config file and the frames are cut here (``frame_patches``)."""
    from transformers import AutoConfig, AutoTokenizer

    config = _from_pretrained(AutoConfig.from_pretrained, path, "config")
    family = family_of(config)
    _, model_cls = _classes(family)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, path, "tokenizer")
    mean, std = processor_statistics(path, family)
    model = _from_pretrained(model_cls.from_pretrained, path, "weights", dtype=dtype,
                             attn_implementation=attn_implementation).to(device)
    use_stream_attention(model)
    llm = QwenVLVideoLLM(model, tokenizer, frame_size, name=path, image_mean=mean, image_std=std)
    llm.trained_positions = getattr(model.config.text_config, "max_position_embeddings", None)
    return llm


PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


def processor_statistics(path: str, family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``image_mean`` / ``image_std`` of the checkpoint's (video) processor config; the family's published values
    where the checkpoint has no such file."""
    import json

    from transformers.utils import cached_file

    for name in PROCESSOR_FILES:
        try:
            file = _from_pretrained(lambda src, _name=name, **kw: cached_file(
                src, _name, _raise_exceptions_for_missing_entries=False, **kw), path, name)
        except ConfigError:
            file = None
        if file:
            stats = json.loads(Path(file).read_text())
            if "image_mean" in stats and "image_std" in stats:
                return tuple(stats["image_mean"]), tuple(stats["image_std"])
    return IMAGE_STATS[family]


class QwenTinyModel(ModelLoader):
    """A random-initialised Qwen2.5-VL / Qwen3-VL (``model.family``) of ``model.tiny`` dimensions at
    ``model.frame_size`` (mechanics only, no download)."""

    kind = "qwen_tiny"

    @classmethod
    def dims(cls, m: Any) -> dict[str, Any]:
        from omegaconf import OmegaConf

        dims = OmegaConf.to_container(m.tiny, resolve=True)
        dims.pop("image_size", None)  # LLaVA-OV's; Qwen-VL frames are model.frame_size
        return dims

    @classmethod
    def _config(cls, m: Any):
        return qwen_tiny_config(_family(m), len(build_qwen_tokenizer()), **cls.dims(m))

    @classmethod
    def geometry(cls, m: Any) -> KVGeometry:
        return qwen_geometry(cls._config(m), resolve_dtype(_value(m.dtype), resolve_device(m.device)), m.frame_size)

    @classmethod
    def load(cls, m: Any) -> VideoLLM:
        device = resolve_device(m.device)
        return build_qwen_tiny(_family(m), m.frame_size, m.seed, device, resolve_dtype(_value(m.dtype), device),
                               **cls.dims(m))


class QwenPretrainedModel(ModelLoader):
    """Qwen2.5-VL / Qwen3-VL weights from a Hub id or a local folder (``model.path``) at ``model.frame_size``."""

    kind = "qwen_pretrained"

    @classmethod
    def geometry(cls, m: Any) -> KVGeometry:
        from transformers import AutoConfig

        config = _from_pretrained(AutoConfig.from_pretrained, PretrainedModel._path(m.path), "config")
        return qwen_geometry(config, resolve_dtype(_value(m.dtype), resolve_device(m.device)), m.frame_size)

    @classmethod
    def load(cls, m: Any) -> VideoLLM:
        device = resolve_device(m.device)
        return load_qwen_pretrained(PretrainedModel._path(m.path), m.frame_size, device,
                                    resolve_dtype(_value(m.dtype), device),
                                    resolve_attn_implementation(_value(m.attn_implementation), device))


def _family(m: Any) -> str:
    family = _value(m.get("family"))
    if family not in FAMILIES:
        raise ConfigError("model.family", f"'{family}' is not a Qwen-VL family; choose one of {', '.join(FAMILIES)}")
    return family
