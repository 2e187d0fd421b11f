"""Structured config schemas, registered in Hydra's ConfigStore so that typos fail at compose time.

Every group's YAML files extend a schema stored here: ``model``, ``dataset``, ``judge``, ``logger``,
``engine`` and ``paths`` have fixed schemas; ``cache`` schemas are generated from the registered cache
method dataclasses (``<name>_schema``), so a method's knobs are declared once, in its Python file.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mukv.video.preprocess import FrameResize


@dataclass
class TinyDims:
    """Dimensions of a model built from config (model=tiny)."""

    image_size: int = 112
    text_layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2


class ModelDtype(str, enum.Enum):
    """model.dtype (mukv.models.loading.resolve_dtype)."""

    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    auto_float16 = "auto_float16"  # fp16 on CUDA (as the published releases load LLaVA-OV), fp32 on CPU
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class AttnImplementation(str, enum.Enum):
    """model.attn_implementation: the vision tower's and plain forwards' kernel."""

    auto = "auto"  # flash_attention_2 if installed and on CUDA, else sdpa
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class QuestionTimes(str, enum.Enum):
    spread = "spread"  # random in the last 90% of the stream
    end = "end"  # every question at the end


class QuestionType(str, enum.Enum):
    """The synthetic benchmark's question types (mukv/data/synthetic.py)."""

    detail = "detail"
    count = "count"
    current = "current"
    order = "order"
    motion = "motion"


@dataclass
class ModelConfig:
    # the loader (mukv/models/loading.py): TinyModel (built here, random weights) | NanoModel (the trained
    # checkpoint shipped in mukv/assets/nano, or a nano folder given as path) | PretrainedModel (Hub id or folder)
    _target_: str = MISSING
    name: str = "tiny"
    path: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: ModelDtype = ModelDtype.auto  # auto (bf16 on CUDA, fp32 on CPU) | auto_float16 (fp16 on CUDA) | float32 | ...
    attn_implementation: AttnImplementation = AttnImplementation.auto  # auto (flash_attention_2 if installed, on CUDA)
    seed: int = 0
    # Frames not at the vision size: pil_uint8 (the checkpoint processor's PIL bicubic on uint8, uint8 out, then
    # rescale and normalise) | torch_float (torch bicubic + antialias in float, no rounding). An enum: a bad
    # value fails at compose time. See mukv/video/preprocess.py.
    resize: FrameResize = FrameResize.pil_uint8
    tiny: TinyDims = field(default_factory=TinyDims)
    # Qwen-VL models (mukv/models/qwen_vl.py): qwen2_5_vl | qwen3_vl (tiny models; checkpoints say their own)
    family: Optional[str] = None
    # Qwen-VL: [height, width] every frame is resized to, multiples of patch x merge (28 for Qwen2.5-VL, 32 for
    # Qwen3-VL); it decides the tokens per step ((H / 28) x (W / 28) for Qwen2.5-VL)
    frame_size: Optional[list[int]] = None


@dataclass
class SyntheticConfig:
    num_videos: int = 2
    duration_s: float = 120.0
    questions_per_video: int = 4
    frame_size: int = 112
    seed: int = 0
    needle_depth: Optional[float] = None  # detail needles at this fraction of the frames shown (null: random)
    question_times: QuestionTimes = QuestionTimes.spread  # spread (random in the last 90%) | end (all at the end)
    question_types: list[QuestionType] = field(default_factory=lambda: list(QuestionType))
    noise: int = 6  # per-pixel noise amplitude
    # 0: one-word answers (judge=exact); N >= 2: each question lists up to N lettered options drawn from its
    # type's answers, the reference is the right option's letter (judge=choice)
    choices: int = 0


class PastEnd(str, enum.Enum):
    """dataset.past_end: what a question asked past its video file's real length gets."""

    fail = "fail"  # recorded as failed, not answered
    answer = "answer"  # answered from the frames that exist, flagged in meta.past_end_s


@dataclass
class DatasetConfig:
    """What every dataset has; ``_target_`` (mukv/data/datasets.py) loads and checks the videos."""

    _target_: str = MISSING
    name: str = MISSING
    sample_fps: float = 0.5
    limit_videos: Optional[int] = None
    limit_questions: Optional[int] = None  # per video, the first N by end_time
    video_ids: list[str] = field(default_factory=list)
    # a question whose end_time is past the video file's real length: fail (recorded as failed, not answered)
    # | answer (answered from the frames that exist, flagged in meta.past_end_s); counted in metrics.json
    past_end: PastEnd = PastEnd.fail
    max_minutes: Optional[float] = None  # truncate streams: drop questions whose end_time is after N minutes
    num_shards: int = 1  # split the videos over jobs: this job runs videos[shard_index::num_shards]
    shard_index: int = 0
    # Question-age buckets for metrics (seconds since the answer's evidence; edges, the last bucket open).
    age_buckets_s: list[float] = field(default_factory=lambda: [0.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
                                                                1800.0, 2700.0, 3600.0])


@dataclass
class RVSDatasetConfig(DatasetConfig):
    """An RVS annotation file and its videos (mukv.data.datasets.RVSDataset)."""

    _target_: str = "mukv.data.datasets.RVSDataset"
    annotation: str = MISSING  # the annotation JSON
    data_root: Optional[str] = None  # where '/data/rvs/...' video paths are resolved
    video_path_prefix: str = "/data/rvs"
    check_videos: bool = True  # fail before the model loads if video files are missing
    # video paths must resolve ('..' and symlinks followed) inside data_root; true reads them anywhere
    allow_outside_root: bool = False


class OVOTask(str, enum.Enum):
    """OVO-Bench's tasks (mukv/data/ovo_bench.py): backward tracing, real-time perception, forward responding."""

    EPM = "EPM"
    ASI = "ASI"
    HLD = "HLD"
    STU = "STU"
    OJR = "OJR"
    ATR = "ATR"
    ACR = "ACR"
    OCR = "OCR"
    FPD = "FPD"
    REC = "REC"
    SSR = "SSR"
    CRR = "CRR"


@dataclass
class OVOBenchDatasetConfig(DatasetConfig):
    """OVO-Bench's annotation file and source videos (mukv.data.datasets.OVOBenchDataset)."""

    _target_: str = "mukv.data.datasets.OVOBenchDataset"
    annotation: str = MISSING  # ovo_bench_new.json
    data_root: Optional[str] = None  # where the records' relative video paths (Ego4D/clips/...) are resolved
    tasks: list[OVOTask] = field(default_factory=lambda: list(OVOTask))  # the tasks asked (all twelve)
    check_videos: bool = True  # fail before the model loads if video files are missing
    # video paths must resolve ('..' and symlinks followed) inside data_root; true reads them anywhere
    allow_outside_root: bool = False


@dataclass
class SyntheticDatasetConfig(DatasetConfig):
    """Procedural streams made on the fly (mukv.data.datasets.SyntheticDataset)."""

    _target_: str = "mukv.data.datasets.SyntheticDataset"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class JudgeConfig:
    """What every judge has; ``_target_`` (a ``mukv.judge`` class) checks the options and builds it; null: no
    judging (judge=none)."""

    _target_: Optional[str] = None
    name: str = "none"


@dataclass
class ExactJudgeConfig(JudgeConfig):
    _target_: Optional[str] = "mukv.judge.exact.ExactMatchJudge"
    name: str = "exact"


@dataclass
class ChoiceJudgeConfig(JudgeConfig):
    """Option letters, Yes / No and counts read from the answer, no model (mukv.judge.choice.ChoiceJudge)."""

    _target_: Optional[str] = "mukv.judge.choice.ChoiceJudge"
    name: str = "choice"


@dataclass
class LLMJudgeConfig(JudgeConfig):
    """Options shared by the LLM judges (the pinned prompt and parser, the judgment cache)."""

    model: Optional[str] = None  # openai: the model name at the endpoint; hf: a Hub id or local folder
    prompt_version: str = "v1"  # the pinned prompt (mukv/judge/prompt.py); part of the cache key
    max_tokens: int = 64  # reply length limit
    max_consecutive_failures: Optional[int] = 10  # stop calling after N failed requests in a row (null: never)
    # judgment cache: sqlite keyed by question, reference, prediction, judge model, prompt version
    cache: bool = True
    cache_path: Optional[str] = None


@dataclass
class OpenAIJudgeConfig(LLMJudgeConfig):
    """Any OpenAI-compatible chat endpoint (mukv.judge.openai.OpenAIJudge)."""

    _target_: Optional[str] = "mukv.judge.openai.OpenAIJudge"
    name: str = "openai"
    base_url: str = "https://api.openai.com/v1"
    api_key_env: Optional[str] = "OPENAI_API_KEY"  # the environment variable holding the key; null: no key
    temperature: float = 0.0
    timeout_s: float = 60.0
    max_retries: int = 5  # retries after the first attempt, exponential backoff
    backoff_s: float = 1.0  # first retry delay; doubles each retry
    backoff_max_s: float = 60.0


@dataclass
class HFJudgeConfig(LLMJudgeConfig):
    """A local transformers causal LM (mukv.judge.hf.HFJudge)."""

    _target_: Optional[str] = "mukv.judge.hf.HFJudge"
    name: str = "hf"
    device: str = "auto"
    dtype: str = "auto"


class LoggerName(str, enum.Enum):
    none = "none"  # local files only
    wandb = "wandb"


class WandbMode(str, enum.Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class AnswerText(str, enum.Enum):
    """engine.answer_text: the answer text the judge sees (mukv.engine.answer_text)."""

    auto = "auto"  # as the published code of the method run
    keep_newlines = "keep_newlines"
    remove_newlines = "remove_newlines"
    spaces = "spaces"  # newlines -> spaces, stripped (not published)


# The judge group's schemas by name (conf/judge/<option>.yaml extends <name>_schema).
JUDGE_SCHEMAS: dict[str, type[JudgeConfig]] = {"none": JudgeConfig, "exact": ExactJudgeConfig,
                                               "choice": ChoiceJudgeConfig, "openai": OpenAIJudgeConfig,
                                               "hf": HFJudgeConfig}


def judge_schema_of(node: dict[str, Any]) -> type[JudgeConfig]:
    """The schema of a judge config: named in its defaults list (a conf/judge file) or by its ``_target_``."""
    for entry in node.get("defaults") or []:
        if isinstance(entry, str) and entry.endswith("_schema") and entry[: -len("_schema")] in JUDGE_SCHEMAS:
            return JUDGE_SCHEMAS[entry[: -len("_schema")]]
    target = node.get("_target_")
    return next((s for s in JUDGE_SCHEMAS.values() if s._target_ == target), JudgeConfig)


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    project: str = "mukv"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.offline
    group: Optional[str] = None  # defaults to task_name (the experiment)
    job_type: Optional[str] = None  # defaults to the mode (eval)
    tags: list[str] = field(default_factory=list)  # method, dataset, model and sweep tags are added
    dir: Optional[str] = None  # defaults to the run's output folder
    plots: bool = True  # log per-run figures (accuracy by age, memory and latency along the stream)


class CompileMode(str, enum.Enum):
    """engine.compile: whether the language model's decoder layers run compiled (``VideoLLM.compile``)."""

    none = "none"  # eager (published)
    default = "default"  # torch.compile, dynamic shapes
    reduce_overhead = "reduce_overhead"  # torch.compile mode="reduce-overhead": CUDA graphs on a GPU

    @property
    def torch_mode(self) -> str:
        return self.value.replace("_", "-")


@dataclass
class EngineConfig:
    encode_chunk_size: int = 64
    max_new_tokens: int = 256
    progress: bool = True
    answer_text: AnswerText = AnswerText.auto  # auto (the published code of the method run) | keep_newlines | ...
    compile: CompileMode = CompileMode.none  # none | default | reduce_overhead (VideoLLM.compile)


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: Any = MISSING  # a DatasetConfig subclass (dataset group)
    cache: Any = MISSING
    judge: Any = MISSING  # a JudgeConfig subclass (judge group)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # true: continue a run folder whose answers were made under the same fingerprint (mukv/resume.py) | false: move
    # them aside, start over | force: continue even though the fingerprint changed (said in the log)
    resume: Any = True
    task_name: str = "eval"
    # A context budget in frames for any cache method: its knobs come from the method's ``budget_knobs`` (the
    # registry, mukv/cache/base.py) and replace the config's; null: the cache config's own knobs
    budget_frames: Optional[int] = None
    # A context budget in video tokens (the init prompt aside) for any cache method: the largest frame budget
    # whose answer context holds at most this many (the method's ``video_tokens``); not with budget_frames
    budget_tokens: Optional[int] = None
    tags: list[str] = field(default_factory=list)
    # explorer.html in the run folder (mukv/report/explorer.py; about 5 MB: it embeds plotly.js); false for
    # large sweeps, where `python -m mukv.report.explorer RUN ...` builds a page when one is wanted
    explorer: bool = True


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
        if group == "hydra" or group.startswith("hydra/") or group == "nano_recipe":  # nano_recipe: the training root's
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
    if not OmegaConf.has_resolver("mukv_methods"):  # the registry in sweep presets: cache: ${mukv_methods:}
        from mukv.sweeps import method_list

        OmegaConf.register_new_resolver("mukv_methods", method_list)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="dataset", name="rvs_schema", node=RVSDatasetConfig)
    cs.store(group="dataset", name="synthetic_schema", node=SyntheticDatasetConfig)
    cs.store(group="dataset", name="ovo_bench_schema", node=OVOBenchDatasetConfig)
    for name, schema in JUDGE_SCHEMAS.items():
        cs.store(group="judge", name=f"{name}_schema", node=schema)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="engine", name="engine_schema", node=EngineConfig)
    cs.store(group="paths", name="paths_schema", node=PathsConfig)
    for name, cls in CACHE_METHODS.items():
        cs.store(group="cache", name=f"{name}_schema", node=cache_schema(cls))
