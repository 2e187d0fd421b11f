"""The one entry point: build the pipeline from a composed config and run it.

Order matters: everything a user can get wrong is checked first (config values, cache knobs against the
model's geometry read from its config, annotation files, video files), then the model loads, then
videos stream. A video that fails is recorded (an ``error`` column) and the run goes on; the return
value says whether anything failed.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from mukv.cache.base import CacheMethod
from mukv.data.types import VideoSample
from mukv.engine import AnswerRecord, EngineSettings, StreamingEngine, VideoRecord
from mukv.errors import ConfigError, MukvError
from mukv.judge import build_judge
from mukv.report.metrics import summarize
from mukv.report.outputs import MEMORY, METRICS, PREDICTIONS, CsvAppender, write_json_atomic

log = logging.getLogger("mukv")


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict[str, Any]
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


# --------------------------------------------------------------------------------------- validation
def _positive(value: float | int | None, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be a positive number, got {value!r}")


def validate_config(cfg: DictConfig) -> None:
    """Checks that need no model and no data; raises ``ConfigError`` naming the field."""
    if cfg.mode not in ("eval", "train"):
        raise ConfigError("mode", f"unknown mode '{cfg.mode}'; choose eval or train")
    if cfg.mode == "train":
        raise ConfigError("mode", "mode=train arrives with the trainable nano model; only mode=eval exists now")
    _positive(cfg.engine.encode_chunk_size, "engine.encode_chunk_size")
    _positive(cfg.engine.max_new_tokens, "engine.max_new_tokens")
    ds = cfg.dataset
    _positive(ds.sample_fps, "dataset.sample_fps")
    _positive(ds.limit_videos, "dataset.limit_videos", allow_none=True)
    _positive(ds.limit_questions, "dataset.limit_questions", allow_none=True)
    if ds.kind not in ("rvs", "synthetic"):
        raise ConfigError("dataset.kind", f"unknown kind '{ds.kind}'; choose rvs or synthetic")
    if ds.kind == "rvs":
        if not ds.annotation:
            raise ConfigError("dataset.annotation", "an RVS annotation JSON file is required")
        if not Path(ds.annotation).is_file():
            raise ConfigError("dataset.annotation", f"file not found: {ds.annotation} (see data/README.md)")
    else:
        syn = ds.synthetic
        for key in ("num_videos", "duration_s", "questions_per_video", "frame_size"):
            _positive(syn[key], f"dataset.synthetic.{key}")
    if cfg.logger.name not in ("none", "wandb"):
        raise ConfigError("logger.name", f"unknown logger '{cfg.logger.name}'; choose none or wandb")
    if cfg.logger.mode not in ("offline", "online", "disabled"):
        raise ConfigError("logger.mode", f"unknown mode '{cfg.logger.mode}'; choose offline, online or disabled")
    build_judge(cfg.judge)


def build_method(cache_cfg: DictConfig) -> CacheMethod:
    """Instantiate the cache method dataclass named by ``_target_`` with the config's knobs."""
    knobs = OmegaConf.to_container(cache_cfg, resolve=True)
    target = knobs.pop("_target_")
    try:
        cls = get_class(target)
    except Exception as err:  # hydra raises a generic error for a bad import path
        raise ConfigError("cache._target_", f"cannot import '{target}': {err}") from err
    return cls(**knobs)


# -------------------------------------------------------------------------------------------- data
def build_dataset(cfg: DictConfig) -> list[VideoSample]:
    """The configured videos with their questions; annotations are fully validated here."""
    ds = cfg.dataset
    if ds.kind == "rvs":
        from mukv.data.rvs import load_rvs_annotations

        videos = load_rvs_annotations(
            ds.annotation, data_root=ds.data_root, sample_fps=ds.sample_fps,
            video_path_prefix=ds.video_path_prefix, limit_videos=ds.limit_videos,
            video_ids=list(ds.video_ids) or None, check_videos=ds.check_videos,
        )
    else:
        from mukv.data.synthetic import SyntheticSpec, make_synthetic_dataset

        syn = ds.synthetic
        videos = make_synthetic_dataset(SyntheticSpec(
            num_videos=syn.num_videos, duration_s=float(syn.duration_s), sample_fps=ds.sample_fps,
            frame_size=syn.frame_size, questions_per_video=syn.questions_per_video, seed=syn.seed,
        ))
        if ds.video_ids:
            videos = [v for v in videos if v.video_id in set(ds.video_ids)]
        if ds.limit_videos:
            videos = videos[: ds.limit_videos]
    if ds.limit_questions:
        for v in videos:
            v.questions = sorted(v.questions, key=lambda q: q.end_time)[: ds.limit_questions]
    return videos


# -------------------------------------------------------------------------------------------- run
def train_eval(cfg: DictConfig, output_dir: str | Path | None = None) -> RunResult:
    """Validate, build and run the configured pipeline; outputs land in ``output_dir``."""
    out = Path(output_dir or cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    validate_config(cfg)
    method = build_method(cfg.cache)
    from mukv.models.loading import load_video_llm, model_geometry

    m = cfg.model
    dims = OmegaConf.to_container(m.tiny, resolve=True) if m.kind == "tiny" else {}
    method.validate(model_geometry(m.kind, m.path, m.device, m.dtype, **dims))
    videos = build_dataset(cfg)
    judge = build_judge(cfg.judge)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (out / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("%d videos, %d questions; loading model %s", len(videos), sum(len(v.questions) for v in videos), m.name)

    llm = load_video_llm(m.kind, m.path, m.device, m.dtype, m.attn_implementation, m.seed, **dims)
    engine = StreamingEngine(llm, method, EngineSettings(**OmegaConf.to_container(cfg.engine, resolve=True)))
    predictions, memory = CsvAppender(out / PREDICTIONS), CsvAppender(out / MEMORY)
    failures: list[str] = []

    def on_answer(rec: AnswerRecord) -> None:
        row = rec.row()
        if judge is not None:
            verdict = judge.judge(rec.question, rec.answer, rec.prediction)
            row.update(judge_correct=verdict.correct, judge_score=verdict.score, judge_error=verdict.error)
        predictions.append(row)

    started = time.time()
    for video in videos:
        try:
            record = engine.run_video(video, on_answer)
        except MukvError as err:  # a broken video is recorded; the run goes on
            log.error("video %s failed: %s", video.video_id, err)
            failures.append(f"{video.video_id}: {err}")
            record = VideoRecord(video.video_id, method.name, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0, 0, error=str(err))
        memory.append(record.__dict__)

    pred_df = _read(out / PREDICTIONS)
    mem_df = _read(out / MEMORY)
    metrics = summarize(pred_df, mem_df, cfg.dataset.sample_fps)
    metrics.update(method=method.name, dataset=cfg.dataset.name, model=m.name, wall_s=time.time() - started,
                   failed_videos=len(failures))
    write_json_atomic(out / METRICS, metrics)
    if cfg.logger.name == "wandb":
        from mukv.report.wandb_logger import WandbLogger

        wb = WandbLogger(cfg.logger, resolved, out, name=f"{cfg.dataset.name}-{method.name}")
        wb.log_tables(pred_df, mem_df)
        wb.log_summary(metrics)
        wb.finish()
    return RunResult(out, metrics, failures)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False) if path.exists() and path.stat().st_size else pd.DataFrame()


def format_summary(metrics: dict[str, Any]) -> str:
    """A short table for the terminal."""
    keys = [("method", "method"), ("questions", "questions"), ("accuracy", "accuracy"),
            ("mean_online_tokens", "online tokens"), ("kv_bytes_total", "KV bytes"),
            ("mean_latency_s", "latency s"), ("encode_fps", "encode fps")]
    lines = []
    for key, label in keys:
        v = metrics.get(key)
        lines.append(f"  {label:<14} {v:.4g}" if isinstance(v, float) else f"  {label:<14} {v}")
    return "\n".join(lines)
