"""What the streaming engine asks of a cache method, and nothing more.

A method sees the video as visual tokens (frames x tokens_per_frame x hidden), keeps whatever KV it wants
while the stream plays (``ingest``), and when a question comes hands back the context the answer attends
to (``recall``): an ``AnswerContext`` with the per-layer keys and values, what of the video they hold
(``Recalled``, for recall diagnostics) and the method's own typed details. The engine then decodes over that
context with the shared ``ContextKV`` mechanics (``mukv.engine.decode_attention``).
A new method is one subclass here (a dataclass of its knobs) registered with ``@register_cache`` plus one
YAML file in ``conf/cache/``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch

from mukv.cache.attention import SinkDistance, SinkHandover, SinkWindowKV
from mukv.cache.options import check_options
from mukv.errors import ConfigError
from mukv.models.adapter import KVGeometry, VideoLLM

CACHE_METHODS: dict[str, type[CacheMethod]] = {}
CONF_CACHE = Path(__file__).resolve().parents[2] / "conf" / "cache"  # where a method's YAML lives


def register_cache(name: str) -> Callable[[type[CacheMethod]], type[CacheMethod]]:
    """Class decorator: make a method available by name (and to ``conf/cache/<name>.yaml``)."""

    def wrap(cls: type[CacheMethod]) -> type[CacheMethod]:
        cls.name = name
        CACHE_METHODS[name] = cls
        return cls

    return wrap


def ordered_methods(with_config: bool = True) -> list[str]:
    """Registered methods in display order (``CacheMethod.display_order``, then name): the order of every
    table, figure and tool listing. ``with_config``: only methods with a ``conf/cache/<name>.yaml`` (the ones
    a run can select)."""
    names = [n for n in CACHE_METHODS if not with_config or (CONF_CACHE / f"{n}.yaml").is_file()]
    return sorted(names, key=lambda n: (CACHE_METHODS[n].display_order, n))


def method_rank(name: str) -> tuple[int, str]:
    """Sort key of a method name in tables (unregistered names last, by name)."""
    cls = CACHE_METHODS.get(name)
    return (cls.display_order if cls is not None else 10**6, name)


def budget_knobs(method: str, frames: int | None, tokens_per_frame: int,
                 config_key: str = "budget_frames") -> dict[str, Any]:
    """The knobs giving ``method`` an answer context of about ``frames`` frames (``{}`` for ``None`` or a
    method without a budget); every tool (``budget_frames=``, benchmarks, reproduce-table, sweeps) maps
    budgets through this one function. ``config_key``: the setting an error names."""
    if frames is None:
        return {}
    cls = CACHE_METHODS[method]
    knobs = cls.budget_knobs(int(frames), int(tokens_per_frame))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(knobs) - names)
    if unknown:  # a budget must never be dropped silently
        raise ConfigError(config_key, f"{cls.__name__}.budget_knobs sets {', '.join(unknown)}, which are not "
                                      f"knobs of cache method '{method}'")
    return knobs


def knob_values(cls: type[CacheMethod], knobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every knob of ``cls`` (a dataclass): its defaults, replaced by ``knobs`` (which may name only some)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    out.update({k: v for k, v in (knobs or {}).items() if k != "_target_"})
    return out


def video_tokens(method: str, knobs: dict[str, Any] | None, tokens_per_frame: int) -> int | None:
    """The video tokens ``method``'s answer context holds at most with ``knobs`` (the others at their
    defaults): ``CacheMethod.video_tokens``; ``None`` for a method without a budget or one that does not say."""
    cls = CACHE_METHODS[method]
    n = cls.video_tokens(knob_values(cls, knobs), int(tokens_per_frame))
    return None if n is None or n is NotImplemented else int(n)


def budget_frames_for_tokens(method: str, tokens: int, tokens_per_frame: int,
                             knobs: dict[str, Any] | None = None) -> tuple[int | None, dict[str, Any]]:
    """``budget_knobs_for_tokens`` with the frame budget it chose (``None`` for a method without a budget)."""
    tokens, tpf = int(tokens), int(tokens_per_frame)
    cls = CACHE_METHODS[method]
    if not budget_knobs(method, 1, tpf, config_key="budget_tokens"):
        return None, {}  # no budget: the method keeps everything
    best: tuple[int, dict[str, Any]] | None = None
    best_n = -1
    # f frames hold at least f video tokens in every method with a budget, so no f above `tokens` can fit
    for f in range(1, max(tokens, 1) + 1):
        step = budget_knobs(method, f, tpf, config_key="budget_tokens")
        n = cls.video_tokens(knob_values(cls, {**(knobs or {}), **step}), tpf)
        if n is None or n is NotImplemented:
            raise ConfigError("budget_tokens", f"cache method '{method}' has a frame budget (budget_knobs) but does "
                                               f"not implement video_tokens, which budget_tokens needs: add the "
                                               f"classmethod {cls.__name__}.video_tokens(knobs, tokens_per_frame)")
        if int(n) > tokens:
            break
        if best is None or int(n) > best_n:  # where contexts stop growing (a cap), the smallest budget reaching it
            best, best_n = (f, step), int(n)
    if best is None:
        smallest = video_tokens(method, {**(knobs or {}), **budget_knobs(method, 1, tpf)}, tpf)
        raise ConfigError("budget_tokens", f"{tokens} video tokens is less than the smallest budget of cache method "
                                           f"'{method}': {smallest} video tokens at 1 frame of {tpf} tokens")
    return best


def budget_knobs_for_tokens(method: str, tokens: int, tokens_per_frame: int,
                            knobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The knobs of the largest frame budget ``f`` (``budget_knobs(method, f, ...)``, f = 1, 2, ...) whose answer
    context holds at most ``tokens`` video tokens (``CacheMethod.video_tokens``, with the method's other knobs
    from ``knobs``, else its defaults): every method then answers from at most ``tokens`` video tokens, as close
    as its budget's granularity allows (``budget_tokens=``). ``{}`` for a method without a budget; raises
    ``ConfigError`` naming ``budget_tokens`` when even one frame holds more, or when the method has a frame
    budget but no ``video_tokens``."""
    return budget_frames_for_tokens(method, tokens, tokens_per_frame, knobs)[1]


@dataclass(frozen=True)
class Recalled:
    """What of the video an answer context holds, for recall diagnostics (``mukv.report.evidence``); never
    used to answer. A method reports whole ``frames`` (indices from 0) or single video ``tokens``
    (``frame * tokens_per_frame + index in the frame``; a ``range`` for a window); ``None``: not reported.
    ``groups`` optionally splits the recalled tokens by what recalled them (MuKV: per granularity), for the
    run explorer (``mukv.report.explorer``)."""

    tokens: range | Sequence[int] | None = None
    frames: Sequence[int] | None = None
    groups: dict[str, Sequence[int]] | None = None


D = TypeVar("D")  # a method's own details of a recall (e.g. ``ReKVRecall``, ``MuKVRecall``)


@dataclass
class AnswerContext(Generic[D]):
    """The recalled context of one question: per-layer rotated keys and values, in attention order."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    next_position: int  # position of the first prompt token (the largest, where layers differ)
    recalled: Recalled = field(default_factory=Recalled)
    detail: D | None = None  # what the method chose and why (tests, diagnostics); its own dataclass
    layer_positions: list[int] | None = None  # per layer, for a method whose layers hold different positions

    def prompt_position(self, layer: int) -> int:
        """Position of the first prompt token in ``layer``."""
        return self.next_position if self.layer_positions is None else int(self.layer_positions[layer])

    @property
    def online_tokens(self) -> int:
        """Tokens the answer attends to before its prompt (what the budget constrains): the largest layer's, where
        layers hold different numbers (StreamKV)."""
        return max(int(k.shape[-2]) for k in self.keys)


@dataclass
class CacheStats:
    """Bytes a method holds for the current video."""

    kv_tokens: int  # tokens whose KV is stored (device + host + disk)
    kv_bytes: int  # bytes of that stored KV
    device_kv_bytes: int  # the part on the accelerator (or in RAM for CPU runs) used while streaming
    aux_bytes: int = 0  # anything else kept per video (e.g. frame features for uniform sampling)


class CacheMethod(abc.ABC):
    """Base class of cache methods. Subclasses are dataclasses whose fields are their config knobs."""

    name: ClassVar[str] = "base"
    # The answer text of the published code this method reproduces (engine.answer_text=auto): MuKV's release
    # keeps newlines; ReKV's removes them (see mukv.engine.answer_text).
    published_answer_text: ClassVar[str] = "keep_newlines"
    # Position in tables, figures and tool listings (``ordered_methods``); a new method sorts after these.
    display_order: ClassVar[int] = 100
    # whether the largest answer context reaches ``video_tokens`` exactly once enough video has streamed
    # (False: it is an upper bound, e.g. StreamKV's per-layer counts vary around their mean)
    video_tokens_exact: ClassVar[bool] = True

    @classmethod
    def budget_knobs(cls, frames: int, tokens_per_frame: int) -> dict[str, Any]:
        """The knobs that give this method an answer context of about ``frames`` frames of
        ``tokens_per_frame`` tokens (``budget_frames=`` in a run, the budget axis of every benchmark and
        sweep). ``{}``: the method has no budget (it keeps everything) and tools run it once."""
        return {}

    @classmethod
    def video_tokens(cls, knobs: dict[str, Any], tokens_per_frame: int) -> int | None:
        """The video tokens (the init prompt aside) this method's answer context holds at most, once enough
        video has streamed, with ``knobs`` (every knob of the method: ``knob_values``). ``None``: the method
        has no budget (it keeps everything). ``budget_tokens=`` maps a budget in tokens onto ``budget_knobs``
        through this; a method with a budget that does not implement it (``NotImplemented``) cannot take one."""
        return NotImplemented

    # The (geometry, knobs) ``validate`` last passed, so that ``bind`` checks only what was not checked yet.
    _validated: tuple[KVGeometry, tuple] | None = None

    def validate(self, geometry: KVGeometry) -> None:
        """Raise ``ConfigError`` (naming the ``cache.<field>``) for knobs that do not fit the model.

        Called by the pipeline with the geometry read from the model config, before any weights load; a
        method built by hand (tests, benchmarks) is validated by ``bind`` instead. Methods put their checks
        in ``check_knobs``.
        """
        self.check_knobs(geometry)
        self._validated = self._knob_state(geometry)

    def check_knobs(self, geometry: KVGeometry) -> None:
        """Hook of ``validate``: raise ``ConfigError`` naming ``cache.<field>`` for a knob that does not fit."""
        return None

    def _knob_state(self, geometry: KVGeometry) -> tuple[KVGeometry, tuple]:
        return geometry, dataclasses.astuple(self) if dataclasses.is_dataclass(self) else ()

    def bind(self, llm: VideoLLM) -> None:
        """Attach the model; called once before the first video. Validates the knobs unless ``validate``
        already passed them on this geometry (validation runs once)."""
        if self._validated != self._knob_state(llm.geometry):
            self.validate(llm.geometry)
        self.llm = llm
        self.geometry = llm.geometry

    @abc.abstractmethod
    def start_video(self, init_ids: list[int]) -> None:
        """Forget the previous video and encode the init prompt (the attention sink)."""

    @abc.abstractmethod
    def ingest(self, visual: torch.Tensor, first_frame: int) -> None:
        """Take the visual tokens (F, tokens_per_frame, hidden) of frames first_frame..first_frame+F-1."""

    @abc.abstractmethod
    def recall(self, question: str) -> AnswerContext:
        """The context to answer ``question`` from; must not change what is kept for later questions."""

    @abc.abstractmethod
    def stats(self) -> CacheStats:
        """Bytes held for the current video."""

    def observe_answer(self, question: str, answer: str) -> None:
        """Hook, after each answer: the question and the answer text (a method that conditions what it keeps on
        the conversation, as HERMES's pseudo-questions do). Default: nothing."""
        return None

    # ------------------------------------------------------------------------------ shared helpers
    def run_layers(self, embeds: torch.Tensor, per_layer: Callable, num_layers: int | None = None) -> torch.Tensor:
        """Forward ``embeds`` with ``per_layer(layer_idx, q, k, v, scaling) -> out`` as attention; ``num_layers``:
        through the first ones only (a probe read in those)."""
        return self.llm.forward(embeds, per_layer, num_layers)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(int(t.numel() * t.element_size()) for t in tensors if t is not None)


@dataclass
class SinkWindowOptions:
    """How the sink + sliding-window encoding (``SinkWindowKV``) treats the init (sink) tokens; the knobs of
    every method that encodes that way (mixed into its dataclass, like ``StoreOptions``)."""

    # published: once the window is full, every query sees the sinks at relative distance n_local - 1 (ReKV's
    # code: its one-angle RoPE helper reads cos[n_local - 1]) | n_local: at distance n_local
    sink_distance: SinkDistance = SinkDistance.published
    # per_block: init tokens join the sink once per frame block (tokens_per_frame), when they leave the window
    # of the block's last query, and the whole block sees them as sinks, so a query whose window still holds
    # them sees them twice (ReKV's code) | exact: a query sees an init token as a sink iff it left its window
    sink_handover: SinkHandover = SinkHandover.per_block

    def validate_sink_window(self) -> None:
        check_options(self, sink_distance=SinkDistance, sink_handover=SinkHandover)

    def sink_window(self, n_local: int | None, query_block: int, geometry: KVGeometry) -> SinkWindowKV:
        """One layer's streaming KV with these options; handover blocks are the model's frames."""
        return SinkWindowKV(n_local, query_block, sink_distance=self.sink_distance,
                            sink_handover=self.sink_handover, block_tokens=geometry.tokens_per_frame)


class WindowStreamingCache(CacheMethod):
    """Shared base of methods that encode the stream with sink + sliding-window attention.

    ``n_local=None`` means no window: every token attends to the whole history (the ``full`` method).
    Methods with a window mix in ``SinkWindowOptions`` (the sinks' distance and handover).
    """

    n_local: int | None
    query_block: int

    def start_video(self, init_ids: list[int]) -> None:
        # The init prompt is the sink: encoded with no window so that all of it is kept.
        if isinstance(self, SinkWindowOptions):
            self.layers = [self.sink_window(None, self.query_block, self.geometry)
                           for _ in range(self.geometry.num_layers)]
        else:
            self.layers = [SinkWindowKV(None, self.query_block) for _ in range(self.geometry.num_layers)]
        self.run_layers(self.llm.embed_ids(init_ids), self._encode_layer)
        for layer in self.layers:
            layer.set_init(layer.k, layer.v)
            layer.n_local = self.n_local
        self.n_init = len(init_ids)
        self.frames_seen = 0

    def _encode_layer(self, idx: int, q, k, v, scaling):
        return self.layers[idx].attend_and_append(q, k, v, scaling, self.llm.rope)

    def ingest(self, visual: torch.Tensor, first_frame: int) -> None:
        embeds = visual.reshape(1, -1, visual.shape[-1])
        self.run_layers(embeds, self._encode_and_capture)
        self.frames_seen = first_frame + visual.shape[0]

    def _encode_and_capture(self, idx: int, q, k, v, scaling):
        self.capture_new_kv(idx, k, v)
        return self._encode_layer(idx, q, k, v, scaling)

    def capture_new_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hook: the un-rotated KV of the tokens being ingested, per layer."""

    def window_context(self) -> AnswerContext:
        """Init sink + the tokens in the window, re-rotated to contiguous positions 0..N-1."""
        keys, values = [], []
        for layer in self.layers:
            if layer.start == 0:  # the sink is still inside the window
                k, v = layer.k, layer.v
            else:
                k, v = torch.cat((layer.init_k, layer.k), dim=-2), torch.cat((layer.init_v, layer.v), dim=-2)
            keys.append(self.llm.rope.rotate_range(k, 0))
            values.append(v)
        first = self.layers[0]
        held = first.k.shape[-2] - (self.n_init if first.start == 0 else 0)  # video tokens in the window
        n_video = self.frames_seen * self.geometry.tokens_per_frame
        return AnswerContext(keys, values, next_position=int(keys[0].shape[-2]),
                             recalled=Recalled(tokens=range(n_video - held, n_video)))

    def window_stats(self) -> CacheStats:
        layer_bytes = [tensor_bytes(L.k, L.v) + (tensor_bytes(L.init_k, L.init_v) if L.start else 0)
                       for L in self.layers]
        tokens = self.layers[0].k.shape[-2] + (self.layers[0].n_init if self.layers[0].start else 0)
        return CacheStats(kv_tokens=int(tokens), kv_bytes=sum(layer_bytes), device_kv_bytes=sum(layer_bytes))

