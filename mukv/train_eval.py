"""The one entry point: build the pipeline from a composed config and run it.

Order matters: everything a user can get wrong is checked first (config values, cache knobs against the
model's geometry read from its config, annotation files, video files), then the model loads, then
videos stream. A video that fails is recorded (an ``error`` column) and the run goes on; the return
value says whether anything failed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from mukv.cache.base import CacheMethod
from mukv.components import component_class
from mukv.data.datasets import dataset_class, scoring_options
from mukv.data.types import VideoSample
from mukv.engine import AnswerRecord, EngineSettings, StreamingEngine, VideoRecord, check_chunk
from mukv.errors import ConfigError, MukvError
from mukv.inputs import check_inputs, screen_past_end
from mukv.judge import build_judge, validate_judge_config
from mukv.models.loading import model_loader
from mukv.report.metrics import summarize, wilson_interval
from mukv.report.outputs import MEMORY, METRICS, PREDICTIONS, RowJournal, journal_path, write_json_atomic
from mukv.resume import (
    FINGERPRINT,
    RunLock,
    StaleResultsError,
    answered_questions,
    arm_faults,
    fault_point,
    fingerprint,
    fingerprint_changes,
    finished_videos,
    read_fingerprint,
)

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
    if not (cfg.resume is True or cfg.resume is False or cfg.resume == "force"):
        raise ConfigError("resume", f"must be true, false or force, got {cfg.resume!r}")
    if cfg.budget_frames is not None:
        _positive(cfg.budget_frames, "budget_frames")
    if cfg.get("budget_tokens") is not None:
        _positive(cfg.budget_tokens, "budget_tokens")
        if cfg.budget_frames is not None:
            raise ConfigError("budget_tokens", f"give one budget: budget_frames={cfg.budget_frames} or "
                                               f"budget_tokens={cfg.budget_tokens}, not both")
    _positive(cfg.engine.encode_chunk_size, "engine.encode_chunk_size")
    _positive(cfg.engine.max_new_tokens, "engine.max_new_tokens")
    ds = cfg.dataset
    _positive(ds.sample_fps, "dataset.sample_fps")
    _positive(ds.limit_videos, "dataset.limit_videos", allow_none=True)
    _positive(ds.limit_questions, "dataset.limit_questions", allow_none=True)
    _positive(ds.max_minutes, "dataset.max_minutes", allow_none=True)
    if not isinstance(ds.num_shards, int) or ds.num_shards < 1:
        raise ConfigError("dataset.num_shards", f"must be a positive integer, got {ds.num_shards!r}")
    if not isinstance(ds.shard_index, int) or not 0 <= ds.shard_index < ds.num_shards:
        raise ConfigError("dataset.shard_index",
                          f"must be in [0, dataset.num_shards={ds.num_shards}), got {ds.shard_index!r}")
    edges = list(ds.age_buckets_s)
    if any(not math.isfinite(e) for e in edges) or edges != sorted(set(edges)):
        raise ConfigError("dataset.age_buckets_s", f"must be strictly increasing finite edges, got {edges}")
    dataset_class(ds).check_config(ds)
    model_loader(cfg.model)  # names model._target_ if it is not a loader
    validate_judge_config(cfg.judge)
    check_inputs(cfg)  # bounds that would otherwise crash or hang after the model loads (mukv/inputs.py)


def build_method(cache_cfg: DictConfig) -> CacheMethod:
    """Instantiate the cache method dataclass named by ``_target_`` with the config's knobs."""
    knobs = OmegaConf.to_container(cache_cfg, resolve=True)
    knobs.pop("_target_")
    return component_class(cache_cfg, "cache")(**knobs)


def apply_budget(cfg: DictConfig, tokens_per_frame: int) -> dict[str, Any]:
    """``budget_frames=N``: write the cache method's budget knobs (``CacheMethod.budget_knobs``, the one
    registry every tool maps budgets through) into ``cfg.cache``, so that the resolved config, the
    fingerprint and the method all see them; returns the knobs set ({} without a budget).
    ``budget_tokens=N``: the same with the knobs of the largest frame budget whose answer context holds at
    most N video tokens (``budget_knobs_for_tokens``: the method's ``video_tokens``)."""
    tokens = cfg.get("budget_tokens")
    if cfg.budget_frames is None and tokens is None:
        return {}
    setting = "budget_frames" if tokens is None else "budget_tokens"
    if cfg.budget_frames is not None and tokens is not None:
        raise ConfigError("budget_tokens", "give one budget: budget_frames or budget_tokens, not both")
    from mukv.cache import CACHE_METHODS, budget_knobs
    from mukv.cache.base import budget_frames_for_tokens

    target = str(cfg.cache._target_)
    name = next((n for n, c in CACHE_METHODS.items() if f"{c.__module__}.{c.__qualname__}" == target), None)
    if name is None:
        raise ConfigError(setting, f"cache._target_ {target} is not a registered cache method")
    if tokens is None:
        knobs = budget_knobs(name, cfg.budget_frames, tokens_per_frame)
    else:
        own = OmegaConf.to_container(cfg.cache, resolve=True)
        frames, knobs = budget_frames_for_tokens(name, tokens, tokens_per_frame, own)
        if knobs:
            log.info("budget_tokens=%s: cache method %s at its %d-frame budget %s", tokens, name, frames, knobs)
    if not knobs:
        log.info("%s=%s: cache method %s has no budget (it keeps everything); ignored", setting, cfg[setting], name)
    for key, value in knobs.items():
        cfg.cache[key] = value
    return knobs


def _budget_video_tokens(method: CacheMethod, tokens_per_frame: int) -> int | None:
    """The video tokens the run's answer context holds at most (``CacheMethod.video_tokens`` of its knobs);
    ``None`` for a method without a budget or one that does not say."""
    from mukv.cache.base import knob_values

    cls = type(method)
    knobs = knob_values(cls, {f.name: getattr(method, f.name) for f in dataclasses.fields(cls)})
    n = cls.video_tokens(knobs, int(tokens_per_frame))
    return None if n is None or n is NotImplemented else int(n)


# -------------------------------------------------------------------------------------------- data
def build_dataset(cfg: DictConfig) -> list[VideoSample]:
    """The configured videos with their questions (``dataset._target_`` loads them, validating annotations),
    then the selection every dataset shares: ``max_minutes``, ``limit_questions``, the shard."""
    ds = cfg.dataset
    videos = dataset_class(ds).load(ds)
    if ds.max_minutes is not None:  # a stream truncated to N minutes: only questions asked by then
        horizon = float(ds.max_minutes) * 60.0
        for v in videos:
            v.questions = [q for q in v.questions if q.end_time <= horizon]
        dropped = [v.video_id for v in videos if not v.questions]
        if dropped:
            log.info("dataset.max_minutes=%g: %d video(s) have no question left: %s", ds.max_minutes, len(dropped),
                     ", ".join(dropped))
        videos = [v for v in videos if v.questions]
        if not videos:
            raise ConfigError("dataset.max_minutes", f"no question is asked in the first {ds.max_minutes:g} minute(s) "
                                                     "of any video: nothing to run")
    if ds.limit_questions:
        for v in videos:
            v.questions = sorted(v.questions, key=lambda q: q.end_time)[: ds.limit_questions]
    selected = shard(videos, ds.shard_index, ds.num_shards)
    if not selected:
        raise ConfigError("dataset.num_shards", f"shard {ds.shard_index} of {ds.num_shards} gets no video (the "
                                                f"selection holds {len(videos)}): use at most {len(videos)} shards")
    return selected


def shard(videos: list[VideoSample], index: int, count: int) -> list[VideoSample]:
    """This job's share of the videos: every ``count``-th video from ``index``, in dataset order (by video,
    deterministic, balanced in count; the shards' union is the whole selection, with no overlap)."""
    return videos[index::count] if count > 1 else videos


# -------------------------------------------------------------------------------------------- run
def train_eval(cfg: DictConfig, output_dir: str | Path | None = None) -> RunResult:
    """Validate, build and run the configured pipeline; outputs land in ``output_dir``, which the run holds
    locked (``run.lock``, :class:`mukv.resume.RunLock`): a second run into it fails naming this one."""
    out = Path(output_dir or cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    validate_config(cfg)
    with RunLock(out) as lock:
        if lock.stale:
            log.warning("run folder %s: took over the lock left by pid %s on host %s, which is no longer running",
                        out, lock.stale.get("pid"), lock.stale.get("host"))
        return _run_locked(cfg, out)


def _run_locked(cfg: DictConfig, out: Path) -> RunResult:
    arm_faults()  # MUKV_FAULT (tests) counts this run's fault points
    m = cfg.model
    loader = model_loader(m)
    geometry = loader.geometry(m)
    check_chunk(cfg.engine.encode_chunk_size, geometry, m.name)
    applied = apply_budget(cfg, geometry.tokens_per_frame)
    method = build_method(cfg.cache)
    method.validate(geometry)
    videos = build_dataset(cfg)
    answered, finished, predictions, memory = _prepare_resume(cfg, out, videos)
    judge = build_judge(cfg.judge)
    if judge is not None:
        judge.prepare()  # an LLM judge that cannot load fails here, before anything streams
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # plain strings for W&B
    (out / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if loader.kind == "nano" and dataset_class(cfg.dataset).kind != "synthetic":  # one line before anything streams
        log.warning("model=nano knows only the synthetic benchmark (it was trained on nothing else): its answers on "
                    "%s mean nothing; use model=llava_ov_0.5b or model.path=<folder> for real video", cfg.dataset.name)
    scored_by = dataset_class(cfg.dataset).judge
    if scored_by and cfg.judge.get("name") != scored_by:  # one line before anything streams
        log.warning("dataset %s is scored with judge=%s (its official scoring); this run judges with judge=%s",
                    cfg.dataset.name, scored_by, cfg.judge.get("name"))
    log.info("%d videos, %d questions; loading model %s", len(videos), sum(len(v.questions) for v in videos), m.name)

    llm = loader.load(m)
    engine = StreamingEngine(llm, method, EngineSettings(**OmegaConf.to_container(cfg.engine, resolve=True)))
    failures: list[str] = []

    def on_answer(rec: AnswerRecord) -> None:
        row = rec.row()
        if judge is not None and rec.error:  # a question that could not be asked is not judged
            row.update(judge_correct=None, judge_score=None, judge_error="not judged: the question failed (error)")
        elif judge is not None:
            verdict = judge.judge(rec.question, rec.answer, rec.prediction)
            row.update(judge_correct=verdict.correct, judge_score=verdict.score, judge_error=verdict.error)
        predictions.append(row)
        fault_point("answer")

    started = time.time()
    for video in videos:
        if video.video_id in finished:
            continue
        try:
            screen_past_end(video, cfg.dataset.past_end, method.name, answered, on_answer)
            record = engine.run_video(video, on_answer, skip=answered)
        except MukvError as err:  # a broken video is recorded; the run goes on
            log.error("video %s failed: %s", video.video_id, err)
            failures.append(f"{video.video_id}: {err}")
            # what was streamed until the error (engine.run_video); nothing if the video did not open
            record = getattr(err, "video_record", None) or VideoRecord(video.video_id, method.name, 0, 0, 0, 0, 0, 0,
                                                                       0.0, 0.0, 0, 0, error=str(err))
        memory.append(record.__dict__)
        fault_point("video")

    predictions.sync()
    memory.sync([v.video_id for v in videos])  # a video's last row (failed, then retried), in dataset order
    pred_df = _read(out / PREDICTIONS)
    mem_df = _read(out / MEMORY)
    budget_tokens = _budget_video_tokens(method, geometry.tokens_per_frame)
    # the seconds of stream the budget's tokens hold as whole frames: the window evidence age is measured in
    window_s = budget_tokens / geometry.tokens_per_frame / cfg.dataset.sample_fps if budget_tokens else None
    metrics = summarize(pred_df, mem_df, cfg.dataset.sample_fps, list(cfg.dataset.age_buckets_s),
                        window_s=window_s, **scoring_options(cfg.dataset))
    metrics.update(method=method.name, dataset=cfg.dataset.name, model=m.name, wall_s=time.time() - started,
                   budget_frames=cfg.budget_frames, budget_tokens=cfg.get("budget_tokens"), budget_knobs=applied,
                   budget_video_tokens=budget_tokens,
                   failed_videos=len(failures), shard_index=cfg.dataset.shard_index,
                   num_shards=cfg.dataset.num_shards, max_minutes=cfg.dataset.max_minutes)
    if judge is not None:
        metrics["judge"] = judge.describe()
        judge.close()
        if metrics.get("invalid_judgments"):
            log.warning("%d answer(s) could not be judged (judge_error column); accuracy is over the %d judged",
                        metrics["invalid_judgments"], metrics.get("judged", 0))
    fault_point("metrics")
    write_json_atomic(out / METRICS, metrics)
    from mukv.report.figures import write_run_figures  # matplotlib: imported only once a run has results

    write_run_figures(pred_df, metrics, out / "figures")  # in every run folder, whatever the logger
    if cfg.get("explorer", True):
        from mukv.report.explorer import write_run_explorer

        write_run_explorer(out)  # explorer.html: what each answer's context recalled, from the run folder alone
    if cfg.logger.name == "wandb":
        _log_wandb(cfg, resolved, out, method.name, pred_df, mem_df, metrics)
    if metrics.get("failed_questions"):  # counted over the whole folder: failures recorded before a resume too
        failures.append(f"{metrics['failed_questions']} question(s) failed: see predictions.csv (error column)")
    return RunResult(out, metrics, failures)


def _hydra_job() -> dict[str, Any]:
    """Where this run sits in a Hydra multirun (empty for a single run or outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return {}
    if hc.mode != RunMode.MULTIRUN:
        return {"overrides": list(hc.overrides.task)}
    return {"overrides": list(hc.overrides.task), "sweep_dir": str(hc.sweep.dir), "job_num": int(hc.job.num),
            "override_dirname": str(hc.job.override_dirname)}


def _log_wandb(cfg: DictConfig, resolved: dict[str, Any], out: Path, method: str, pred_df: pd.DataFrame,
               mem_df: pd.DataFrame, metrics: dict[str, Any]) -> None:
    """One W&B run: grouped by experiment (logger.group or task_name), tagged by method, dataset, model and
    sweep; config, summary, tables (predictions, memory) and the run's figures."""
    from mukv.report.wandb_logger import WandbLogger

    lg, job = cfg.logger, _hydra_job()
    name = f"{cfg.dataset.name}-{method}"
    tags = [*lg.tags, *cfg.tags, f"method:{method}", f"dataset:{cfg.dataset.name}", f"model:{cfg.model.name}"]
    if job.get("sweep_dir"):
        tags.append(f"sweep:{Path(job['sweep_dir']).name}")
        if job.get("override_dirname"):
            name = f"{name}[{job['override_dirname']}]"[:128]
    if cfg.dataset.num_shards > 1:
        tags.append(f"shard:{cfg.dataset.shard_index}/{cfg.dataset.num_shards}")
    wb = WandbLogger(lg, {**resolved, "hydra_job": job}, out, name=name, group=lg.group or cfg.task_name,
                     job_type=lg.job_type or "eval", tags=list(dict.fromkeys(tags)))
    wb.log_tables(pred_df, mem_df)
    if lg.plots and len(pred_df):
        from mukv.report.figures import run_figures

        wb.log_images(run_figures(pred_df, metrics, out / "figures"))
    wb.log_summary(metrics)
    wb.finish()


def _prepare_resume(cfg: DictConfig, out: Path, videos: list[VideoSample]
                    ) -> tuple[set[str], set[str], RowJournal, RowJournal]:
    """(answered question ids, finished video ids, predictions journal, memory journal) of ``out``.

    Results already there are reused only if ``fingerprint.json`` matches this run's fingerprint
    (:func:`mukv.resume.fingerprint`), else a ``StaleResultsError`` names what changed; ``resume=force``
    reuses them anyway (and says so), ``resume=false`` moves earlier outputs to ``out/previous-<time>/``
    (never deleted) and starts over. Every resume says what it reuses, in the log and on the console."""
    resume = cfg.resume
    names = (PREDICTIONS, MEMORY, METRICS, FINGERPRINT, journal_path(out / PREDICTIONS).name,
             journal_path(out / MEMORY).name)
    if resume is False and any((out / name).exists() for name in names if name != FINGERPRINT):
        stamp, n = time.strftime("previous-%Y%m%d-%H%M%S"), 1
        backup = out / stamp
        while backup.exists():
            n += 1
            backup = out / f"{stamp}-{n}"
        backup.mkdir()
        for name in names:
            if (out / name).exists():
                (out / name).rename(backup / name)
        log.info("resume=false: earlier outputs moved to %s", backup)
    predictions = RowJournal(out / PREDICTIONS, ident="qid", journal_only=("recalled",))  # recall: for the explorer
    memory = RowJournal(out / MEMORY, key="video_id")
    for journal in (predictions, memory):
        if journal.skipped:
            log.warning("%s: %d damaged line(s) skipped (their questions are asked again)", journal.path,
                        journal.skipped)
    answered, finished = answered_questions(predictions.rows), finished_videos(memory.rows)
    new = fingerprint(cfg)
    if predictions.rows or memory.rows:
        changes = fingerprint_changes(read_fingerprint(out), new)
        what = (f"{len(answered)} answered question(s) and {len(finished)} finished video(s) "
                f"of {len(videos)}")
        if changes and resume != "force":
            raise StaleResultsError(
                f"run folder {out} holds {what} made under a different setup: {'; '.join(changes)}. "
                "Rerun with resume=false to move them aside and start over, or resume=force to reuse them")
        if changes:
            new["reused_despite"] = changes
            log.warning("resume=force: reusing %s in %s, made under a different setup: %s", what, out,
                        "; ".join(changes))
        else:
            log.info("resuming in %s: reusing %s (%s matches this run)", out, what, FINGERPRINT)
    write_json_atomic(out / FINGERPRINT, new)
    predictions.sync()  # a CSV row cut by a kill (or a CSV from before the journal) is rendered again
    memory.sync([v.video_id for v in videos])
    return answered, finished, predictions, memory


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False) if path.exists() and path.stat().st_size else pd.DataFrame()


def format_summary(metrics: dict[str, Any]) -> str:
    """A short table for the terminal."""
    keys = [("method", "method"), ("questions", "questions"), ("accuracy", "accuracy"),
            ("mean_score", "score"), ("invalid_judgments", "invalid judg."), ("invalid_answers", "invalid answ."),
            ("mean_online_tokens", "online tokens"), ("kv_bytes_total", "KV bytes"),
            ("kv_gb_per_hour", "KV GB/hour"), ("mean_ttft_s", "TTFT s"), ("mean_latency_s", "latency s"),
            ("encode_fps", "encode fps")]
    lines = []
    for key, label in keys:
        v = metrics.get(key)
        if key == "invalid_answers" and not v:  # only where a choice judge found answers with no choice
            continue
        if key == "accuracy" and isinstance(v, float) and metrics.get("judged"):  # with its 95% interval and n
            lo, hi = wilson_interval(int(metrics.get("correct") or 0), int(metrics["judged"]))
            lines.append(f"  {label:<14} {100 * v:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%, "
                         f"n={metrics['judged']} judged)")
            by_type = metrics.get("by_type") or {}
            for name, cat in (metrics.get("by_category") or {}).items():  # what each kind of question measures
                if cat.get("judged"):
                    line = (f"    {name:<12} {100 * cat['accuracy']:.1f}% (95% CI {100 * cat['accuracy_lo']:.1f}-"
                            f"{100 * cat['accuracy_hi']:.1f}%, n={cat['judged']})")
                    if cat.get("macro_accuracy") is not None:  # the leaderboard's: the mean of its types'
                        types = [f"{t} {100 * by_type[t]['accuracy']:.1f}%" for t in cat.get("types") or ()
                                 if (by_type.get(t) or {}).get("judged")]
                        line += f"; mean of its types {100 * cat['macro_accuracy']:.2f}%" + (
                            f" ({', '.join(types)})" if types else "")
                    lines.append(line)
            if metrics.get("macro_accuracy") is not None:
                lines.append(f"    {'overall':<12} {100 * metrics['macro_accuracy']:.2f}% (the mean of the categories' "
                             "means of their types)")
            by_window = {k: b for k, b in (metrics.get("by_window_age") or {}).items() if b.get("judged")}
            if by_window:  # evidence inside the budget's window of recent stream, and older
                parts = [f"{k.replace('_', ' ')} {100 * b['accuracy']:.0f}% (n={b['judged']})" for k, b in by_window.items()]
                lines.append(f"    by evidence age in windows of {metrics['window_s']:g} s: {', '.join(parts)}")
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{k} {x:.2f}" for k, x in v.items())
        lines.append(f"  {label:<14} {v:.4g}" if isinstance(v, float) else f"  {label:<14} {v}")
    return "\n".join(lines)
