"""Structured config schemas, registered in Hydra's ConfigStore so that typos fail at compose time.

Every group's YAML files extend a schema stored here: ``model``, ``dataset``, ``judge``, ``logger``,
``engine`` and ``paths`` have fixed schemas; ``cache`` schemas are generated from the registered cache
method dataclasses (``<name>_schema``), so a method's knobs are declared once, in its Python file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mukv.video.preprocess import FrameResize


@dataclass
class TinyDims:
    """Dimensions of a model built from config (model.kind=tiny)."""

    image_size: int = 112
    text_layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2


@dataclass
class ModelConfig:
    name: str = "tiny"
    # tiny (built here, random weights) | nano (the trained checkpoint shipped in mukv/assets/nano, or a nano
    # folder given as path) | pretrained (Hub id or local folder)
    kind: str = "tiny"
    path: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | auto_float16 (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16
    attn_implementation: str = "auto"  # auto (flash_attention_2 if installed and on CUDA, else sdpa) | sdpa | eager
    seed: int = 0
    # Frames not at the vision size: pil_uint8 (the checkpoint processor's PIL bicubic on uint8, uint8 out, then
    # rescale and normalise) | torch_float (torch bicubic + antialias in float, no rounding). An enum: a bad
    # value fails at compose time. See mukv/video/preprocess.py.
    resize: FrameResize = FrameResize.pil_uint8
    tiny: TinyDims = field(default_factory=TinyDims)


@dataclass
class SyntheticConfig:
    num_videos: int = 2
    duration_s: float = 120.0
    questions_per_video: int = 4
    frame_size: int = 112
    seed: int = 0
    needle_depth: Optional[float] = None  # detail needles at this fraction of the frames shown (null: random)
    question_times: str = "spread"  # spread (random in the last 90%) | end (every question at the end)
    question_types: list[str] = field(default_factory=lambda: ["detail", "count", "current", "order", "motion"])
    noise: int = 6  # per-pixel noise amplitude


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: str = MISSING  # rvs | synthetic
    sample_fps: float = 0.5
    annotation: Optional[str] = None  # rvs: the annotation JSON
    data_root: Optional[str] = None  # rvs: where '/data/rvs/...' video paths are resolved
    video_path_prefix: str = "/data/rvs"
    limit_videos: Optional[int] = None
    limit_questions: Optional[int] = None  # per video, the first N by end_time
    video_ids: list[str] = field(default_factory=list)
    check_videos: bool = True  # rvs: fail before the model loads if video files are missing
    # rvs: video paths must resolve ('..' and symlinks followed) inside data_root; true reads them anywhere
    allow_outside_root: bool = False
    # a question whose end_time is past the video file's real length: fail (recorded as failed, not answered)
    # | answer (answered from the frames that exist, flagged in meta.past_end_s); counted in metrics.json
    past_end: str = "fail"
    max_minutes: Optional[float] = None  # truncate streams: drop questions whose end_time is after N minutes
    num_shards: int = 1  # split the videos over jobs: this job runs videos[shard_index::num_shards]
    shard_index: int = 0
    # Question-age buckets for metrics (seconds since the answer's evidence; edges, the last bucket open).
    age_buckets_s: list[float] = field(default_factory=lambda: [0.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
                                                                1800.0, 2700.0, 3600.0])
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class JudgeConfig:
    name: str = "exact"  # exact | openai | hf | none
    model: Optional[str] = None  # openai: the model name at the endpoint; hf: a Hub id or local folder
    prompt_version: str = "v1"  # the pinned prompt (mukv/judge/prompt.py); part of the cache key
    max_tokens: int = 64  # reply length limit
    # openai (any OpenAI-compatible chat endpoint)
    base_url: str = "https://api.openai.com/v1"
    api_key_env: Optional[str] = "OPENAI_API_KEY"  # the environment variable holding the key; null: no key
    temperature: float = 0.0
    timeout_s: float = 60.0
    max_retries: int = 5  # retries after the first attempt, exponential backoff
    backoff_s: float = 1.0  # first retry delay; doubles each retry
    backoff_max_s: float = 60.0
    max_consecutive_failures: Optional[int] = 10  # stop calling after N failed requests in a row (null: never)
    # hf (a local transformers causal LM)
    device: str = "auto"
    dtype: str = "auto"
    # judgment cache (LLM judges): sqlite keyed by question, reference, prediction, judge model, prompt version
    cache: bool = True
    cache_path: Optional[str] = None


@dataclass
class LoggerConfig:
    name: str = "none"  # none (local files only) | wandb
    project: str = "mukv"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None  # defaults to task_name (the experiment)
    job_type: Optional[str] = None  # defaults to the mode (eval)
    tags: list[str] = field(default_factory=list)  # method, dataset, model and sweep tags are added
    dir: Optional[str] = None  # defaults to the run's output folder
    plots: bool = True  # log per-run figures (accuracy by age, memory and latency along the stream)


@dataclass
class EngineConfig:
    encode_chunk_size: int = 64
    max_new_tokens: int = 256
    progress: bool = True
    answer_text: str = "auto"  # auto (the published code of the method run) | keep_newlines | remove_newlines | spaces


@dataclass
class TrainConfig:
    """mode=train (model=nano dataset=synthetic): the nano training recipe, see mukv/train.py."""

    steps: int = 20000  # planned steps; the schedule ends at whichever of steps / max_minutes comes first
    max_minutes: float = 55.0
    batch_size: int = 16
    lr: float = 1.5e-3
    weight_decay: float = 0.01
    warmup: float = 0.03
    grad_clip: float = 1.0
    min_frames: int = 2
    max_frames: int = 32
    sample_fps: float = 0.5
    save_every_s: float = 300.0
    val_videos: int = 48
    seed: int = 0
    threads: int = 0  # 0: torch's default
    questions_per_stream: int = 12  # questions per training stream (cycling types; 0: one per type)
    bf16: Optional[bool] = None  # bf16 autocast in the training forward (fp32 weights); null: where the CPU has native bf16
    # curriculum (fractions of the schedule; see mukv/train.py TrainSettings)
    short_phase: float = 0.1
    ramp_end: float = 0.45
    full_only_until: float = 0.12
    empty_until: float = 0.05
    detail_only_until: float = 0.15
    all_types_from: float = 0.3
    aux_weight: float = 0.5
    probe_cells: bool = True  # the aux probe also predicts each visual token's cell (see mukv/train.py CellProbe)
    probe_words: bool = True  # the aux probe scores classes against the answer words' embeddings (CellProbe)
    attend_weight: float = 1.0  # attention supervision on the evidence tokens (mukv/train.py AttentionTargets)
    attend_layers: list[int] = field(default_factory=lambda: [2, 3])
    attend_head: str = "mean"  # which heads attend_weight supervises: best (any one), mean (all), or an index ("0")
    attend_types: list[str] = field(default_factory=lambda: ["current"])  # supervised types
    attend_until: float = 0.5  # attend_weight applies until this fraction of the schedule
    count_weight: float = 1.0  # a head spreads its attention over the rings + a sink at "count" answers (CountTargets)
    count_layer: int = 1
    count_head: int = 3
    count_probe_weight: float = 1.0  # counting readout at "count" answers, through the digit words (mukv/train.py CountProbe)
    count_probe_layer: int = 2
    count_probe_until: float = 0.5  # count_probe_weight applies until this fraction of the schedule
    cell_words: bool = True  # "row r" / "column c" are single tokens (mukv/models/nano.py build_word_tokenizer)
    parse_weight: float = 1.0  # probe of the asked cell at "current" answers (mukv/train.py AskedCellProbe)
    parse_layer: int = 2
    parse_attend_layers: list[int] = field(default_factory=lambda: [0, 1])  # the answer attends to the cell words
    motion_weight: float = 0.5  # direction probe on the ball tokens' hidden state (mukv/train.py MotionProbe)
    motion_layer: int = 2
    motion_attend_layers: list[int] = field(default_factory=lambda: [0, 1])  # ball tokens attend to the previous ball
    motion_attend_heads: list[int] = field(default_factory=list)  # ... in these heads only ([]: any head)
    motion_words: bool = True  # the direction probe scores against the direction words' embeddings (MotionProbe)
    order_weight: float = 1.0  # at each needle token, which needles came before (mukv/train.py OrderProbe)
    order_layer: int = 2
    order_attend_layers: list[int] = field(default_factory=lambda: [0, 1])  # needle tokens attend to earlier needles
    order_attend_heads: list[int] = field(default_factory=list)  # ... in these heads only ([]: any head)
    order_until: float = 0.5  # order_weight applies until this fraction of the schedule
    separate_weight: float = 1.0  # keeps each answer set's word embeddings apart (mukv/train.py answer_word_separation)
    separate_margin: float = 0.2
    detail_share: float = 0.1
    mid_frames: int = 16
    long_share: float = 0.3
    subset_share: float = 0.25  # share of streams that carry a random subset of the question types (stream_types)
    text_heads: Optional[int] = None  # the language model's query heads (null: the nano default; from scratch only)
    text_kv_heads: Optional[int] = None  # ... and key-value heads
    init_from: Optional[str] = None  # continue from a nano checkpoint folder (a second stage)
    publish: bool = False  # copy the best checkpoint over mukv/assets/nano (the shipped one)


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    cache: Any = MISSING
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mode: str = "eval"  # eval | train
    # true: continue a run folder whose answers were made under the same fingerprint (mukv/resume.py) | false: move
    # them aside, start over | force: continue even though the fingerprint changed (said in the log)
    resume: Any = True
    task_name: str = "eval"
    seed: int = 0
    tags: list[str] = field(default_factory=list)


def _plain_type(tp: Any) -> Any:
    """OmegaConf wants typing.Optional / typing.List rather than ``X | None`` / ``list[X]``."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return Optional[_plain_type(args[0])] if len(args) == 1 else Any
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return list[_plain_type(arg)]
    return tp


def cache_schema(cls: type) -> type:
    """A structured-config dataclass with ``_target_`` plus the method dataclass's fields."""
    hints = typing.get_type_hints(cls)
    specs: list[tuple[str, Any, Any]] = [("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))]
    for f in dataclasses.fields(cls):
        default = (field(default_factory=f.default_factory) if f.default_factory is not dataclasses.MISSING
                   else field(default=f.default))
        specs.append((f.name, _plain_type(hints[f.name]), default))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", specs)


def _launch_cwd() -> str:
    """``paths.root_dir``: the folder the command was started in. Hydra's ``${hydra:runtime.cwd}`` is not set
    while a multirun resolves ``hydra.sweep.dir`` (before any job), so fall back to the process's cwd."""
    import os

    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        cwd = HydraConfig.get().runtime.cwd
        if cwd:
            return str(cwd)
    return os.getcwd()


def _output_dir(*, _root_: Any) -> str:
    """``paths.output_dir``: the job's folder. Outside a job (``--cfg job --resolve``) Hydra has not set it yet:
    the folder ``hydra.run.dir`` names, i.e. where this command would write."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        raise ValueError("paths.output_dir is only known inside a Hydra run (set it explicitly)")
    hc = HydraConfig.get()
    if not OmegaConf.is_missing(hc.runtime, "output_dir") and hc.runtime.output_dir:
        return str(hc.runtime.output_dir)
    raw = OmegaConf.to_container(hc.run, resolve=False)["dir"]
    scratch = OmegaConf.create({**OmegaConf.to_container(_root_, resolve=False), "__mukv_run_dir": raw})
    return os.path.abspath(str(scratch["__mukv_run_dir"]))


def public_options(options: Any) -> list[str]:
    """A config group's options a user picks from: the structured ``<name>_schema`` entries left out."""
    return sorted(o for o in options if not str(o).endswith("_schema"))


def _config_groups_help() -> str:
    """``--help``'s group list (Hydra's ``$APP_CONFIG_GROUPS`` lists the ``*_schema`` entries too)."""
    from hydra.core.global_hydra import GlobalHydra

    hydra_app = GlobalHydra.instance().hydra
    if hydra_app is None:
        return ""
    lines = []
    for group in sorted(hydra_app.list_all_config_groups()):
        if group == "hydra" or group.startswith("hydra/"):
            continue
        options = public_options(hydra_app.config_loader.get_group_options(group))
        if options:
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    from omegaconf import OmegaConf

    import mukv.cache  # noqa: F401  (registers the methods)
    from mukv.cache.base import CACHE_METHODS
    from mukv.resume import short_hash

    if not OmegaConf.has_resolver("mukv_hash"):
        OmegaConf.register_new_resolver("mukv_hash", lambda text: short_hash(str(text)))
    if not OmegaConf.has_resolver("mukv_cwd"):
        OmegaConf.register_new_resolver("mukv_cwd", _launch_cwd)
    if not OmegaConf.has_resolver("mukv_output_dir"):
        OmegaConf.register_new_resolver("mukv_output_dir", _output_dir)
    if not OmegaConf.has_resolver("mukv_config_groups"):
        OmegaConf.register_new_resolver("mukv_config_groups", _config_groups_help)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    cs.store(group="judge", name="judge_schema", node=JudgeConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="engine", name="engine_schema", node=EngineConfig)
    cs.store(group="paths", name="paths_schema", node=PathsConfig)
    for name, cls in CACHE_METHODS.items():
        cs.store(group="cache", name=f"{name}_schema", node=cache_schema(cls))
