"""``VideoLLM``: the surface of a LLaVA-OneVision model that the engine and the cache methods use.

It turns frames into visual tokens (vision tower, projector, 2x bilinear pooling, no per-frame newline,
as the published streaming code does), text into embeddings, runs the language model with a cache
method's attention callable, and maps hidden states to logits. Nothing here knows about cache methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from mukv.models import attention_hook
from mukv.models.attention_hook import LayerAttention
from mukv.models.rope import RotaryTable
from mukv.video.preprocess import FrameResize, frame_resize, preprocess_frames

# The published ReKV / MuKV prompts for the Qwen2 chat template.
DEFAULT_INIT_PROMPT = "<|im_start|>system \nYou are a helpful assistant.<|im_end|><|im_start|>user "
DEFAULT_QUESTION_TEMPLATE = "\n{question}<|im_end|><|im_start|>assistant\n"


@dataclass(frozen=True)
class KVGeometry:
    """Shapes that decide KV memory: everything byte accounting and budgets need, no weights."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    tokens_per_frame: int  # tokens of one step of the stream (what cache methods call a frame)
    dtype_bytes: int
    frames_per_step: int = 1  # video frames one step embeds (Qwen-VL's temporal patch: 2)
    grid: tuple[int, int] | None = None  # (rows, columns) of a step's tokens, where the model lays them out in 2-D

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, every KV head: 2 x layers x kv_heads x head_dim x bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_config(cls, config, dtype: torch.dtype) -> KVGeometry:
        """Geometry of a ``LlavaOnevisionConfig`` (weights not needed)."""
        text, vision = config.text_config, config.vision_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        side = vision.image_size // vision.patch_size
        pooled = -(-side // 2)
        return cls(
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=head_dim,
            hidden_size=text.hidden_size,
            tokens_per_frame=pooled * pooled,
            dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        )


class VideoLLM:
    """A LLaVA-OneVision model, its tokenizer and its frame preprocessing, on one device and dtype."""

    def __init__(
        self,
        model,
        tokenizer,
        image_mean: tuple[float, float, float],
        image_std: tuple[float, float, float],
        init_prompt: str = DEFAULT_INIT_PROMPT,
        question_template: str = DEFAULT_QUESTION_TEMPLATE,
        name: str = "llava-onevision",
        resize: FrameResize | str = FrameResize.pil_uint8,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.config = model.config
        self.geometry = self.make_geometry(model.config, self.dtype)
        self.image_size = getattr(model.config.vision_config, "image_size", None)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.resize = frame_resize(resize)
        # Positions 0 .. trained_positions - 1 are those the model saw in training (init prompt + video); an
        # answer context reaching past them measures extrapolation too. None: unknown. Set by the loaders.
        self.trained_positions: int | None = None
        self.init_prompt = init_prompt
        self.question_template = question_template
        lm = self.language_model
        self.rope = RotaryTable(lm.rotary_emb.inv_freq)
        if self.positions_at_zero:  # the layers' own rotary step is the identity: skipped (attention_hook)
            attention_hook.skip_identity_rotation(lm)
        self.eos_token_ids = {tokenizer.eos_token_id}
        if tokenizer.convert_tokens_to_ids("<|im_end|>") is not None:
            self.eos_token_ids.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))

    # whether ``forward`` runs the language model with every position id at 0 (the handler rotates): LLaVA-OV's
    # does; an adapter that hands the model real positions (Qwen-VL's in-frame offsets) sets False
    positions_at_zero: ClassVar[bool] = True
    # engine.compile: the torch.compile mode of the decoder layers (``compile``); None: eager
    compiled: str | None = None

    def compile(self, mode: str = "default") -> None:
        """Compile every decoder layer with ``torch.compile`` (dynamic shapes: chunks, blocks, questions and
        decoded tokens share the compiled code instead of recompiling per length). The stream attention stays
        eager, as one opaque operator inside the compiled layer (``attention_hook.stream_attention``); the
        compiled part is the rest of the layer, whose dozens of operator calls become a few fused kernels.
        ``reduce-overhead`` adds CUDA graphs on a GPU, split around the attention (graph partitioning)."""
        if self.compiled == mode:
            return
        import torch._dynamo
        import torch._inductor.config as inductor
        import torch.fx.experimental._config as fx_config

        layers = self.language_model.layers
        # Each layer is one more guarded entry of one code object, and each method's shapes (chunks, batches of
        # blocks, questions, tokens) a few more: past the limit, torch would run new shapes eagerly.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64 * len(layers)))
        if hasattr(fx_config, "use_duck_shape"):  # two lengths equal once are not assumed equal for ever
            fx_config.use_duck_shape = False
        if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 64 * len(layers))
        if mode == "reduce-overhead" and hasattr(inductor, "graph_partition"):
            inductor.graph_partition = True
        for layer in layers:
            layer.compile(dynamic=True, mode=None if mode == "default" else mode)
        self.compiled = mode

    @contextlib.contextmanager
    def attention_kwargs(self, attention: LayerAttention) -> Iterator[dict]:
        """How a forward hands ``attention`` to the layers: as a keyword argument, or (compiled layers) through
        ``attention_hook.set_current`` with ``DEFERRED`` in its place, the outer handler restored afterwards."""
        if self.compiled is None:
            yield {"mukv_attention": attention}
            return
        outer = attention_hook.current()
        attention_hook.set_current(attention)
        try:
            yield {"mukv_attention": attention_hook.DEFERRED}
        finally:
            attention_hook.set_current(outer)

    @contextlib.contextmanager
    def first_layers(self, num_layers: int | None) -> Iterator[None]:
        """The language model cut to its first ``num_layers`` decoder layers for the forwards inside (a probe
        whose attention is read in those layers only: the later ones would compute what nobody reads). The
        hidden states such a forward returns are not the model's output. None or every layer: unchanged."""
        layers = self.language_model.layers
        if num_layers is None or num_layers >= len(layers):
            yield
            return
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.language_model.layers = layers[:num_layers]  # a ModuleList of the same modules
        try:
            yield
        finally:
            self.language_model.layers = layers

    def make_geometry(self, config, dtype: torch.dtype) -> KVGeometry:
        """The KV geometry of ``config`` (each model family's adapter says how its tokens are laid out)."""
        return KVGeometry.from_config(config, dtype)

    def token_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding part of tokens from ``encode_frames`` / ``embed_ids`` (adapters that pack side channels
        after it, as Qwen-VL's, drop them here): what a method compares frames by."""
        return tokens

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Visual tokens (steps, N, packed) from embeddings (steps, N, hidden) made elsewhere (random tokens of
        the benchmarks): LLaVA-OV's are the embeddings themselves."""
        return features

    # ----------------------------------------------------------------------------------------- parts
    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def vision_tower(self):
        return self.model.model.vision_tower

    # ------------------------------------------------------------------------------------ vision side
    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (n, H, W, 3) -> normalised (n, 3, S, S) in the model dtype: by default as the checkpoint's
        processor (PIL bicubic to S x S on uint8, rescale, normalise), see ``mukv.video.preprocess``."""
        x = preprocess_frames(frames, self.image_size, self.image_mean, self.image_std, self.resize)
        return x.to(self.device, self.dtype)

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """Visual tokens of each frame: (n, tokens_per_frame, hidden)."""
        pixels = self.preprocess(frames)
        cfg = self.config
        out = self.vision_tower(pixels, output_hidden_states=True)
        layer = cfg.vision_feature_layer
        if isinstance(layer, int):
            feats = out.hidden_states[layer]
        else:
            feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        feats = self.model.model.multi_modal_projector(feats)
        return self.model.model.apply_pooling(feats)

    # -------------------------------------------------------------------------------------- text side
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def init_prompt_ids(self) -> list[int]:
        return self.tokenize(self.init_prompt)

    def question_prompt_ids(self, question: str) -> list[int]:
        return self.tokenize(self.question_template.format(question=question))

    def embed_ids(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        ids_t = torch.as_tensor(ids, device=self.device, dtype=torch.long).view(1, -1)
        return self.language_model.embed_tokens(ids_t)

    def decode(self, ids: list[int], clean_up: bool = False) -> str:
        """Text of ``ids``, special tokens skipped. ``clean_up``: the tokenizer's clean-up of spaces before
        punctuation and contractions (" ." -> ".", " n't" -> "n't"), which the published releases ask for with
        ``clean_up_tokenization_spaces=True``. Transformers 5 ignores that flag for BPE tokenizers such as
        Qwen2's, and the transformers these releases ran on applied it, so it is applied here explicitly."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self.tokenizer.clean_up_tokenization(text) if clean_up else text

    # --------------------------------------------------------------------------------- language model
    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, attention: LayerAttention, num_layers: int | None = None) -> torch.Tensor:
        """Run the language model over ``embeds`` (1, L, D) with ``attention`` owning every layer's
        attention and cache; returns the final normed hidden states (1, L, D). ``num_layers``: only the first
        ones run (``first_layers``: a probe)."""
        from mukv.cache.instrumentation import OpCounter

        OpCounter.add_forward(embeds)
        pos = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        with self.attention_kwargs(attention) as handed, self.first_layers(num_layers):
            out = self.language_model(
                inputs_embeds=embeds.to(self.dtype), position_ids=pos, use_cache=False,
                attention_mask=attention_hook.handled_mask(embeds.device), **handed,
            )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()
