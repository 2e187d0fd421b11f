"""The recipe: the loop's settings, the network, the curriculum and the signals, and its Hydra schema.

Every knob is declared once, in a dataclass: ``LoopConfig`` (``train.*``), ``NetConfig`` (``net.*``),
``Curriculum`` (``curriculum.*``) and each signal's config (``signals.<name>.*``, from ``SIGNALS``). The
structured schema ``train_nano_schema`` that ``conf/train_nano.yaml`` extends is generated from them (as
``mukv.config.cache_schema`` generates the cache schemas), so a typo or a wrong type fails at compose time
naming the key, and a new signal needs no YAML.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from mukv.errors import ConfigError
from mukv_nano.curriculum import Curriculum
from mukv_nano.layouts import LAYOUTS
from mukv_nano.probes import AskedCellProbe, CellProbe, CountProbe, MotionProbe, OrderProbe
from mukv_nano.signals import AnswerAttention, AnswerWordSeparation, CountingHead, ModelShape, Signal

# The signals, in the order they are built (the probes' initial weights are drawn in it) and their loss
# terms summed.
SIGNALS: dict[str, type[Signal]] = {s.name: s for s in (
    CellProbe, AnswerAttention, CountingHead, MotionProbe, OrderProbe, AskedCellProbe, CountProbe,
    AnswerWordSeparation)}

# signals.<name>: one field per signal, its config dataclass with that signal's defaults
Signals = dataclasses.make_dataclass(
    "Signals", [(name, cls.Config, field(default_factory=cls.Config)) for name, cls in SIGNALS.items()])
Signals.__doc__ = "Every training signal's config, by name (generated from SIGNALS)."


@dataclass
class LoopConfig:
    """The loop: schedule, optimiser, validation and checkpoints."""

    steps: int = 20000  # planned steps; the schedule ends at whichever of steps / max_minutes comes first
    max_minutes: float = 55.0
    batch_size: int = 16
    lr: float = 1.5e-3
    weight_decay: float = 0.01
    warmup: float = 0.03  # fraction of the schedule
    grad_clip: float = 1.0
    # bf16 autocast for the forward (fp32 weights and optimiser): ~1.3x faster on AVX512-BF16 / AMX CPUs, ~100x
    # slower where bf16 is emulated (AVX2). null: on exactly where the CPU runs bf16 natively (fast_bf16)
    bf16: bool | None = None
    save_every_s: float = 300.0  # validate and save last/ (and best/) this often
    val_videos: int = 48  # validation streams (training seed range, never trained on)
    seed: int = 0
    threads: int = 0  # 0: torch's default
    publish: bool = False  # copy the best checkpoint over mukv/assets/nano (the shipped one)


@dataclass
class NetConfig:
    """The network trained: from scratch (its tokenizer and head counts) or on from a checkpoint."""

    # "row r" / "column c" are single tokens (mukv/models/nano.py build_word_tokenizer); the asked-cell probe
    # (signals.parse) reads them
    cell_words: bool = True
    # the language model's query / key-value heads (null: the nano default, NANO_DIMS); from scratch only
    text_heads: int | None = None
    text_kv_heads: int | None = None
    init_from: str | None = None  # continue from a nano checkpoint folder (a second stage)

    def head_dims(self) -> dict:
        """``build_nano`` keyword arguments for the head counts set here."""
        return {k: v for k, v in (("text_heads", self.text_heads), ("text_kv_heads", self.text_kv_heads))
                if v is not None}

    def shape(self) -> ModelShape:
        """(attention heads, layers) of the language model this run trains: the ``init_from`` checkpoint's
        (read from its config, no weights), else the one ``build_nano`` makes."""
        from mukv.models.nano import NANO_DIMS, read_nano_config

        if self.init_from:
            text = read_nano_config(self.init_from, "net.init_from").text_config
            return ModelShape(text.num_attention_heads, text.num_hidden_layers, self.cell_words)
        return ModelShape({**NANO_DIMS, **self.head_dims()}["text_heads"], NANO_DIMS["text_layers"], self.cell_words)


@dataclass
class Recipe:
    """Everything a training run is made of; constructing one checks it (``ConfigError`` naming the knob)."""

    train: LoopConfig = field(default_factory=LoopConfig)
    net: NetConfig = field(default_factory=NetConfig)
    curriculum: Curriculum = field(default_factory=Curriculum)
    signals: Signals = field(default_factory=Signals)  # type: ignore[valid-type]

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """The checks that need no model: ranges, and layer / head indices against the model's shape."""
        t, c, n = self.train, self.curriculum, self.net
        for where, value in (("train.steps", t.steps), ("train.max_minutes", t.max_minutes),
                             ("train.batch_size", t.batch_size), ("train.lr", t.lr),
                             ("curriculum.max_frames", c.max_frames), ("curriculum.sample_fps", c.sample_fps)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(where, f"must be a positive number, got {value!r}")
        if c.min_frames < 2 or c.min_frames > c.max_frames:
            raise ConfigError("curriculum.min_frames", "must be in [2, curriculum.max_frames]")
        if not 0.0 <= c.subset_share <= 1.0:
            raise ConfigError("curriculum.subset_share", f"is a share of the streams in [0, 1], got {c.subset_share}")
        bad = sorted(set(c.layout_weights) - set(LAYOUTS))
        if bad or not any(w > 0 for w in c.layout_weights.values()):
            raise ConfigError("curriculum.layout_weights",
                              f"weights of the layouts {list(LAYOUTS)}, some positive; got {dict(c.layout_weights)}")
        for name in ("text_heads", "text_kv_heads"):
            if getattr(n, name) is not None and getattr(n, name) < 1:
                raise ConfigError(f"net.{name}", f"must be a positive head count, got {getattr(n, name)}")
        _check_dims(n.head_dims())
        shape = n.shape()
        for name, cls in SIGNALS.items():
            cls.check(getattr(self.signals, name), shape)


def _check_dims(dims: dict) -> None:
    """Head counts that the nano language model can be built with (checked before it is)."""
    from mukv.models.nano import NANO_DIMS

    d = {**NANO_DIMS, **dims}
    if d["text_hidden"] % d["text_heads"]:
        raise ConfigError("net.text_heads", f"must divide the hidden size {d['text_hidden']}, got {d['text_heads']}")
    if d["text_heads"] % d["text_kv_heads"]:
        raise ConfigError("net.text_kv_heads", f"must divide net.text_heads ({d['text_heads']}), got {d['text_kv_heads']}")


# ----------------------------------------------------------------------------------- Hydra schema
def _plain_type(tp: Any) -> Any:
    """OmegaConf wants ``Optional[X]`` / ``List[X]`` / ``Dict[K, V]`` rather than ``X | None`` / ``list[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return typing.Optional[_plain_type(args[0])] if len(args) == 1 else Any
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return typing.List[_plain_type(arg)]  # noqa: UP006
    if origin is dict:
        key, value = typing.get_args(tp) or (str, Any)
        return typing.Dict[key, _plain_type(value)]  # noqa: UP006
    return tp


def schema_of(cls: type) -> type:
    """A structured-config dataclass with ``cls``'s fields and defaults (nested dataclasses too)."""
    hints = typing.get_type_hints(cls)
    specs: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = schema_of(tp)
            specs.append((f.name, sub, field(default_factory=sub)))
        elif f.default_factory is not dataclasses.MISSING:
            specs.append((f.name, _plain_type(tp), field(default_factory=f.default_factory)))
        else:
            specs.append((f.name, _plain_type(tp), field(default=f.default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", specs)


def root_schema() -> type:
    """The root of ``conf/train_nano.yaml``: the ``model`` / ``dataset`` / ``paths`` groups of the core (typed by
    their own schemas, which their YAML files extend), ``task_name`` and the recipe."""
    recipe = schema_of(Recipe)
    specs: list[tuple[str, Any, Any]] = [("model", Any, field(default=None)), ("dataset", Any, field(default=None)),
                                         ("paths", Any, field(default=None)), ("task_name", str, field(default="train_nano"))]
    specs += [(f.name, f.type, field(default_factory=f.default_factory)) for f in dataclasses.fields(recipe)]
    return dataclasses.make_dataclass("TrainNanoSchema", specs)


HELP_GROUPS = ("model", "dataset", "nano_recipe")  # the groups --help lists (conf/ holds the evaluation's too)


def _groups_help() -> str:
    """``--help``'s group list: the options of the groups this entry point composes."""
    from hydra.core.global_hydra import GlobalHydra

    from mukv.config import public_options

    app = GlobalHydra.instance().hydra
    if app is None:
        return ""
    return "\n".join(f"{g}: {', '.join(public_options(app.config_loader.get_group_options(g)))}" for g in HELP_GROUPS)


def register_configs() -> None:
    """The core's schemas and resolvers (``model``, ``dataset``, ``paths``, ``hydra``), and ours."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from mukv.config import register_configs as register_core

    register_core()
    if not OmegaConf.has_resolver("mukv_nano_config_groups"):
        OmegaConf.register_new_resolver("mukv_nano_config_groups", _groups_help)
    ConfigStore.instance().store(name="train_nano_schema", node=root_schema())


def _build(cls: type, data: Any) -> Any:
    """``cls`` from a plain container (nested dataclasses built field by field)."""
    if not dataclasses.is_dataclass(cls) or not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    return cls(**{k: _build(hints[k], v) for k, v in data.items()})


def recipe_from_config(cfg: Any) -> Recipe:
    """The ``Recipe`` of a composed ``conf/train_nano.yaml`` (checked on construction)."""
    from omegaconf import OmegaConf

    return _build(Recipe, {f.name: OmegaConf.to_container(cfg[f.name], resolve=True) for f in dataclasses.fields(Recipe)})
