"""Build or load LLaVA-OneVision models: a Hub id or local folder, or the tiny random model (no download)."""

from __future__ import annotations

import importlib.util
import logging
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from mukv.errors import ConfigError
from mukv.models import attention_hook
from mukv.models.adapter import VideoLLM
from mukv.models.tokenizer import build_byte_tokenizer
from mukv.video.preprocess import FrameResize, frame_resize

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError("model.device", f"'{device}' is not a device; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device", f"'{device}' requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError("model.device", f"'{device}' is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run natively here. CPUs without AVX512-BF16 or AMX emulate bf16 at a few
    hundredths of their fp32 speed (0.5 vs 111 GFLOP/s measured on an AVX2-only EPYC), so bf16 must be opt-in
    there, never a default."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume the common case, no native bf16
        return False


# On CUDA: ``auto`` takes bf16; ``auto_float16`` takes float16, as both published releases (MuKV, ReKV) load
# LLaVA-OneVision (the LLaVA-OV configs' default). Both take float32 on the CPU, which emulates half types.
AUTO_DTYPES = {"auto": torch.bfloat16, "auto_float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype in AUTO_DTYPES:
        return AUTO_DTYPES[dtype] if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError("model.dtype", f"unknown dtype '{dtype}'; choose one of {', '.join(AUTO_DTYPES)}, "
                                         f"{', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_attn_implementation(choice: str, device: torch.device) -> str:
    """The attention kernel for the vision tower and for plain (non-streaming) text forwards."""
    if choice == "auto":
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"
    if choice == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation", "flash_attention_2 needs the 'flash' extra (flash-attn)")
    return choice


def tiny_config(vocab_size: int, image_size: int = 112, text_layers: int = 2, hidden: int = 64,
                heads: int = 4, kv_heads: int = 2, vision_hidden: int = 32, vision_layers: int = 2,
                max_positions: int = 1 << 20) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision config of tiny dimensions (Qwen2 text, SigLIP vision, real architecture)."""
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=2, image_size=image_size, patch_size=14,
    )
    text = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        rope_theta=1_000_000.0, tie_word_embeddings=True,
    )
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_token_index=vocab_size - 1, video_token_index=vocab_size - 2,
        tie_word_embeddings=True,
    )


def llava_ov_config(size: str = "0.5b") -> LlavaOnevisionConfig:
    """LLaVA-OneVision dimensions (SigLIP so400m + Qwen2), no weights."""
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=384, patch_size=14)
    if size == "0.5b":
        text = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    elif size == "7b":
        text = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4)
    else:
        raise ValueError(f"unknown size {size}")
    return LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), vision_feature_layer=-1,
                                vision_feature_select_strategy="full")


def build_tiny(seed: int, device: torch.device, dtype: torch.dtype,
               resize: FrameResize | str = FrameResize.pil_uint8, **dims) -> VideoLLM:
    """A seeded, random-initialised tiny LLaVA-OneVision with a locally built tokenizer."""
    tokenizer = build_byte_tokenizer()
    config = tiny_config(len(tokenizer), **dims)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model = model.to(device=device, dtype=dtype)
    use_stream_attention(model)
    return VideoLLM(model, tokenizer, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), name="tiny",
                    resize=resize)


# ------------------------------------------------------------------------------------ Hub or local folder
HUB_TIMEOUT_S = 3.0  # one connection attempt to the Hub (or its proxy) decides whether it is reachable
_hub_reachable: dict[str, bool] = {}  # endpoint -> reachable, probed once per process


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face Hub can be reached: False at once under ``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE``, else one TCP connection to the endpoint (``HF_ENDPOINT``) or to the proxy that
    would carry it, bounded by ``timeout_s`` (name resolution included); decided once per process. Loads
    then use the local cache only, so an offline machine fails in seconds instead of after the Hub client's
    retries."""
    from huggingface_hub import constants

    endpoint = hub_endpoint()
    if constants.HF_HUB_OFFLINE:
        return False
    if endpoint not in _hub_reachable:
        url = urlsplit(endpoint)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        proxy = urllib.request.getproxies().get(url.scheme)
        if proxy and not urllib.request.proxy_bypass(host):
            purl = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            host, port = purl.hostname or "", purl.port or 8080
        ok: list[bool] = []

        def probe() -> None:
            try:
                with socket.create_connection((host, port), timeout=timeout_s):
                    ok.append(True)
            except (OSError, UnicodeError):
                pass

        thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
        thread.start()
        thread.join(timeout_s)
        _hub_reachable[endpoint] = bool(ok)
        if not ok:
            log.info("the Hugging Face Hub (%s) is unreachable: loading from the local cache only", endpoint)
    return _hub_reachable[endpoint]


def _offline_error(path: str, field: str = "model.path") -> ConfigError:
    return ConfigError(
        field, f"'{path}' is not in the local Hugging Face cache and the Hub ({hub_endpoint()}) cannot be "
               f"reached; download it where the Hub is reachable (hf download {path} --local-dir DIR), "
               f"copy DIR here and set {field}=DIR (a local folder)")


def _looks_like_folder(path: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else (absolute, ``./``, ``~``, deeper) is a folder."""
    return path.startswith(("/", ".", "~", "\\")) or path.count("/") > 1 or "\\" in path


def pretrained_source(path: str, field: str = "model.path") -> tuple[str, bool]:
    """(what ``from_pretrained`` is given, whether it must stay in local files) for ``path`` (the config field
    ``field``: ``model.path``, ``judge.model``): a local folder as is; a Hub id from the local cache only when
    the Hub is unreachable; a folder that does not exist is named."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ConfigError(field, f"'{path}' is a file; give a Hub id or a model folder")
        return str(local), True
    if _looks_like_folder(path):
        raise ConfigError(field, f"folder not found: {path}")
    return path, not hub_reachable()


def _from_pretrained(load, path: str, what: str, *, field: str = "model.path", **kwargs):
    """``load(source, local_files_only=..., **kwargs)`` with every failure to find the files as one line
    naming the config field ``field``."""
    from huggingface_hub.errors import HFValidationError  # a malformed Hub id

    source, local_only = pretrained_source(path, field)
    try:
        return load(source, local_files_only=local_only, **kwargs)
    except (OSError, HFValidationError) as err:
        if local_only and source == path:  # a Hub id while offline, not in the cache
            raise _offline_error(path, field) from err
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ConfigError(field, f"cannot load the {what} from '{path}': {first}") from err


def load_pretrained(path: str, device: torch.device, dtype: torch.dtype, attn_implementation: str,
                    resize: FrameResize | str = FrameResize.pil_uint8) -> VideoLLM:
    """Load weights, tokenizer and image statistics from a Hub id or a local folder."""
    from transformers import AutoProcessor

    processor = _from_pretrained(AutoProcessor.from_pretrained, path, "processor")
    model = _from_pretrained(LlavaOnevisionForConditionalGeneration.from_pretrained, path, "weights",
                             dtype=dtype, attn_implementation=attn_implementation).to(device)
    use_stream_attention(model)
    stats = getattr(processor, "video_processor", None) or processor.image_processor
    llm = VideoLLM(model, processor.tokenizer, tuple(stats.image_mean), tuple(stats.image_std), name=path,
                   resize=resize)
    # the language model's context length (Qwen2: 32,768), what its RoPE was trained to
    llm.trained_positions = getattr(model.config.text_config, "max_position_embeddings", None)
    return llm


def load_nano(path: str | None, device: torch.device, dtype: torch.dtype,
              resize: FrameResize | str = FrameResize.pil_uint8) -> VideoLLM:
    """The shipped nano checkpoint (``mukv/assets/nano``) or a nano folder written by ``python -m mukv_nano.train``."""
    from mukv.models.nano import load_nano_checkpoint, nano_dir, read_meta, trained_video_frames

    model, tokenizer = load_nano_checkpoint(path, dtype)
    model = model.to(device)
    use_stream_attention(model)
    meta = read_meta(nano_dir(path))
    llm = VideoLLM(model, tokenizer, tuple(meta.get("image_mean", (0.5,) * 3)),
                   tuple(meta.get("image_std", (0.5,) * 3)), name="nano", resize=resize)
    frames = trained_video_frames(meta)
    if frames:  # init prompt + the longest training stream
        llm.trained_positions = len(llm.init_prompt_ids()) + frames * llm.geometry.tokens_per_frame
    return llm


def use_stream_attention(model) -> None:
    """Point the text model at the mukv_stream implementation (its plain path is SDPA)."""
    model.model.language_model.config._attn_implementation = attention_hook.register()


def load_video_llm(kind: str, path: str | None, device: str = "auto", dtype: str = "auto",
                   attn_implementation: str = "auto", seed: int = 0,
                   resize: FrameResize | str = FrameResize.pil_uint8, **dims) -> VideoLLM:
    """The loaded model of loader ``kind`` ('tiny': built here, 'nano': the shipped checkpoint or the nano folder
    ``path``, 'pretrained': ``path``; ``LOADERS``); ``resize`` is how frames not at the vision size are resized
    (``mukv.video.preprocess.FrameResize``)."""
    loader = _loader(kind)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        resize = frame_resize(resize)
    except ValueError as err:
        raise ConfigError("model.resize", str(err)) from err
    return loader.build(path, dev, dt, attn_implementation, seed, resize, **dims)


def model_geometry(kind: str, path: str | None, device: str = "auto", dtype: str = "auto", **dims):
    """The KV geometry of loader ``kind``'s model from its config alone (no weights), for validating cache knobs
    early."""
    loader = _loader(kind)
    return loader.config_geometry(path, resolve_dtype(dtype, resolve_device(device)), **dims)


def _loader(kind: str) -> type[ModelLoader]:
    if kind not in LOADERS:
        raise ConfigError("model.kind", f"unknown kind '{kind}'; choose {', '.join(repr(k) for k in LOADERS)}")
    return LOADERS[kind]


def _value(choice: Any) -> Any:
    """A config enum member as its plain string (what transformers and the dtype tables expect)."""
    return getattr(choice, "value", choice)


class ModelLoader:
    """A model a config can name (``model._target_``): its KV geometry from the config alone (validating cache
    knobs before any weights load) and the loaded ``VideoLLM``. A loader is ``config_geometry`` + ``build``."""

    kind: ClassVar[str] = "model"  # the label in fingerprints and messages

    @classmethod
    def dims(cls, m: Any) -> dict[str, Any]:
        return {}

    @classmethod
    def config_geometry(cls, path: str | None, dtype: torch.dtype, **dims):
        raise NotImplementedError

    @classmethod
    def build(cls, path: str | None, device: torch.device, dtype: torch.dtype, attn_implementation: str, seed: int,
              resize: FrameResize, **dims) -> VideoLLM:
        raise NotImplementedError

    @classmethod
    def geometry(cls, m: Any):
        return model_geometry(cls.kind, m.path, m.device, _value(m.dtype), **cls.dims(m))

    @classmethod
    def load(cls, m: Any) -> VideoLLM:
        return load_video_llm(cls.kind, m.path, m.device, _value(m.dtype), _value(m.attn_implementation), m.seed,
                              m.resize, **cls.dims(m))


class TinyModel(ModelLoader):
    """A random-initialised LLaVA-OneVision of ``model.tiny`` dimensions (mechanics only)."""

    kind = "tiny"

    @classmethod
    def dims(cls, m: Any) -> dict[str, Any]:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(m.tiny, resolve=True)

    @classmethod
    def config_geometry(cls, path, dtype, **dims):
        from mukv.models.adapter import KVGeometry

        return KVGeometry.from_config(tiny_config(len(build_byte_tokenizer()), **dims), dtype)

    @classmethod
    def build(cls, path, device, dtype, attn_implementation, seed, resize, **dims) -> VideoLLM:
        return build_tiny(seed, device, dtype, resize, **dims)


class NanoModel(ModelLoader):
    """The nano checkpoint shipped in mukv/assets/nano, or a nano folder (``model.path``)."""

    kind = "nano"

    @classmethod
    def config_geometry(cls, path, dtype, **dims):
        from mukv.models.adapter import KVGeometry
        from mukv.models.nano import read_nano_config

        return KVGeometry.from_config(read_nano_config(path), dtype)

    @classmethod
    def build(cls, path, device, dtype, attn_implementation, seed, resize, **dims) -> VideoLLM:
        return load_nano(path, device, dtype, resize)


class PretrainedModel(ModelLoader):
    """LLaVA-OneVision weights from a Hub id or a local folder (``model.path``)."""

    kind = "pretrained"

    @staticmethod
    def _path(path: str | None) -> str:
        if not path:
            raise ConfigError("model.path", "a Hub id or a local folder is required for a pretrained model")
        return path

    @classmethod
    def config_geometry(cls, path, dtype, **dims):
        from mukv.models.adapter import KVGeometry

        config = _from_pretrained(LlavaOnevisionConfig.from_pretrained, cls._path(path), "LLaVA-OneVision config")
        return KVGeometry.from_config(config, dtype)

    @classmethod
    def build(cls, path, device, dtype, attn_implementation, seed, resize, **dims) -> VideoLLM:
        path = cls._path(path)
        return load_pretrained(path, device, dtype, resolve_attn_implementation(attn_implementation, device), resize)


LOADERS: dict[str, type[ModelLoader]] = {c.kind: c for c in (TinyModel, NanoModel, PretrainedModel)}


def model_loader(m: Any) -> type[ModelLoader]:
    """The loader class ``model._target_`` names."""
    from mukv.components import component_class

    cls = component_class(m, "model")
    if cls is None or not (isinstance(cls, type) and issubclass(cls, ModelLoader)):
        raise ConfigError("model._target_", f"must name a mukv.models.loading.ModelLoader class, got {m.get('_target_')!r}")
    return cls
