"""Input checks beyond the config schema, and questions asked past the real end of their video.

``check_inputs`` runs inside ``validate_config`` (no model, no data read): it bounds values that are
well-typed but would crash or hang only after the model has loaded, each failure one ``ConfigError`` naming
the field. ``screen_past_end`` runs when a video opens, before it streams: a question whose ``end_time`` lies
past the file's real length would otherwise be answered from the frames that exist, with no word.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection
from typing import Any

from omegaconf import DictConfig

from mukv.data.types import VideoSample
from mukv.engine import AnswerRecord
from mukv.errors import ConfigError

log = logging.getLogger("mukv")

# The decoder reserves its KV buffer for max_new_tokens up front (mukv.engine.decode_attention): 1e9
# tokens asked for hundreds of GB after the model had loaded. 32,768 is Qwen2's context length.
MAX_NEW_TOKENS = 32768
# A synthetic scene holds a per-frame occupancy table and object timeline: 1e9 s never finished building,
# its memory growing. 200,000 frames build in seconds (about 111 hours at 0.5 fps).
MAX_SYNTHETIC_FRAMES = 200_000

PAST_END_TOLERANCE_S = 1.0  # question times are whole seconds, a container's length is not
PAST_END_KEY = "past_end_s"  # predictions' meta: how far past the video's end the question was asked


def check_inputs(cfg: DictConfig) -> None:
    """Bounds on an eval config's values (see the module docstring); raises ``ConfigError``."""
    n = cfg.engine.max_new_tokens
    if isinstance(n, int) and n > MAX_NEW_TOKENS:
        raise ConfigError("engine.max_new_tokens", f"must be at most {MAX_NEW_TOKENS} (the decoder reserves its KV "
                                                   f"for that many tokens up front), got {n}")
    ds = cfg.dataset
    if "synthetic" in ds:
        duration, fps = ds.synthetic.duration_s, ds.sample_fps
        if isinstance(duration, (int, float)) and isinstance(fps, (int, float)) and duration * fps > MAX_SYNTHETIC_FRAMES:
            raise ConfigError("dataset.synthetic.duration_s",
                              f"{duration:g} s at dataset.sample_fps={fps:g} is {duration * fps:.4g} frames per video; "
                              f"a synthetic stream holds at most {MAX_SYNTHETIC_FRAMES:,} "
                              f"({MAX_SYNTHETIC_FRAMES / fps / 3600:.4g} hours at this rate)")


def screen_past_end(video: VideoSample, policy: str, method: str, skip: Collection[str],
                    record: Callable[[AnswerRecord], Any]) -> None:
    """Check ``video``'s questions against its file's real length (opening it) before it streams.

    A question asked more than ``PAST_END_TOLERANCE_S`` past the end is flagged in its meta
    (``past_end_s``). ``policy='fail'``: it is taken out of the video's questions and recorded, unless in
    ``skip`` (already recorded), through ``record`` as an ``AnswerRecord`` with its error and no prediction.
    ``policy='answer'``: it stays and is answered from the frames that exist. Sources that do not know their
    length (synthetic streams, made to fit their questions) are not checked. Opening errors propagate.
    """
    length = getattr(video.source, "duration_s", None)
    if length is None:
        return
    length = float(length)
    if video.duration > length + PAST_END_TOLERANCE_S:
        log.warning("video %s: the annotation says it lasts %g s; the file holds %.1f s", video.video_id,
                    video.duration, length)
    kept, past = [], []
    for q in video.questions:
        over = q.end_time - length
        if over <= PAST_END_TOLERANCE_S:
            kept.append(q)
            continue
        q = dataclasses.replace(q, meta={**q.meta, PAST_END_KEY: over})
        past.append(q)
        if policy == "answer":
            kept.append(q)
    if not past:
        return
    where = video.meta.get("video_path", video.video_id)
    if policy == "answer":
        log.warning("video %s: %d question(s) asked past the end of %s (%.1f s long): answered from the frames "
                    "that exist (dataset.past_end=answer), flagged in meta.%s", video.video_id, len(past), where,
                    length, PAST_END_KEY)
    for q in past if policy != "answer" else ():
        error = (f"end_time {q.end_time:g} s is past the end of video {where} ({length:.1f} s long): not answered "
                 "(dataset.past_end=answer answers it from the frames that exist)")
        log.error("question %s: %s", q.qid, error)
        if q.qid not in skip:
            record(AnswerRecord(
                video_id=video.video_id, qid=q.qid, question=q.question, answer=q.answer, prediction="",
                start_time=q.start_time, end_time=q.end_time, qtype=q.qtype, method=method, frames_seen=None,
                online_tokens=None, kv_tokens=None, kv_bytes=None, encode_s=None, recall_s=None, ttft_s=None,
                latency_s=None, new_tokens=None, error=error, meta=dict(q.meta)))
    video.questions = kept
