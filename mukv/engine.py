"""The streaming loop (the published protocol), independent of the cache method it drives.

Per video: the method encodes the init prompt (the sink); questions are taken in ``end_time`` order;
before each, every frame up to ``end_time * sample_fps`` is encoded in chunks of ``encode_chunk_size``
frames (from where the previous question stopped); the method recalls a context; the answer is decoded
greedily over it (the question's KV is never kept). Timing and memory are measured here, once, for all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mukv.cache.attention import ContextKV
from mukv.cache.base import AnswerContext, CacheMethod
from mukv.config import AnswerText, CompileMode
from mukv.data.types import Question, VideoSample, frames_until, iter_chunks
from mukv.errors import ConfigError, MukvError
from mukv.models.adapter import KVGeometry, VideoLLM
from mukv.report.evidence import evidence_recalled
from mukv.report.recall import pack_recalled

ANSWER_TEXTS = tuple(a.value for a in AnswerText)  # engine.answer_text's choices, declared once (mukv.config)


def answer_text(llm: VideoLLM, tokens: list[int], style: str) -> str:
    """The text the judge sees. ``keep_newlines`` (MuKV's release) and ``remove_newlines`` (ReKV's:
    every newline removed) decode as both releases do, with the tokenizer's clean-up of spaces and without
    stripping; ``spaces`` (not published) replaces newlines with spaces and strips."""
    if style == "spaces":
        return llm.decode(tokens).replace("\n", " ").strip()
    text = llm.decode(tokens, clean_up=True)
    if style == "remove_newlines":
        return text.replace("\n", "")
    if style == "keep_newlines":
        return text
    raise ValueError(f"unknown answer text '{style}'; choose one of {', '.join(ANSWER_TEXTS)}")


def decode_attention(context: AnswerContext, llm: VideoLLM, reserve: int) -> Callable:
    """The attention callable the engine decodes with: each layer appends the prompt and the answer's tokens
    to its ``ContextKV`` (``reserve`` tokens of room allocated up front)."""
    layers = [ContextKV(k, v, context.prompt_position(i), reserve)
              for i, (k, v) in enumerate(zip(context.keys, context.values, strict=True))]

    def attend(idx: int, q, k, v, scaling):
        return layers[idx].attend_and_append(q, k, v, scaling, llm.rope)

    return attend


def check_chunk(chunk: int, geometry: KVGeometry, model: str) -> None:
    """``engine.encode_chunk_size`` must be whole steps of the model (Qwen-VL embeds 2 frames at once)."""
    step = geometry.frames_per_step
    if chunk % step:
        raise ConfigError("engine.encode_chunk_size", f"{chunk} frames do not make whole steps of {step} frames "
                                                      f"(model {model} embeds {step} frames at once)")


@dataclass
class EngineSettings:
    encode_chunk_size: int = 64
    max_new_tokens: int = 256
    progress: bool = True
    answer_text: str = "auto"  # auto: the published code of the method being run (CacheMethod.published_answer_text)
    compile: str = "none"  # none | default | reduce_overhead: the decoder layers compiled (VideoLLM.compile)


@dataclass
class Answer:
    """A decoded answer and how it was produced."""

    text: str
    token_ids: list[int]
    first_token_logits: torch.Tensor
    prefill_s: float  # prompt prefill until the first token's logits (time to first token after recall)
    decode_s: float


@dataclass
class AnswerRecord:
    """One row of predictions.csv."""

    video_id: str
    qid: str
    question: str
    answer: str
    prediction: str
    start_time: float
    end_time: float
    qtype: str | None
    method: str
    frames_seen: int
    online_tokens: int
    kv_tokens: int
    kv_bytes: int
    encode_s: float  # encoding the frames shown since the previous question
    recall_s: float  # the method's recall (retrieval, fresh encoding for uniform sampling)
    ttft_s: float  # question arrives -> first answer token (recall + prompt prefill)
    latency_s: float  # question arrives -> full answer
    new_tokens: int
    error: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    # share of the question's evidence in the recalled context (mukv.report.evidence, from the context's
    # ``Recalled``); None where the question names none or the method does not report what it recalled
    evidence_recalled: float | None = None
    # the position of the first prompt token: where the recalled context ends in RoPE positions
    answer_position: int | None = None
    # the context reaches past the positions the model was trained on (VideoLLM.trained_positions): its answer
    # measures extrapolation as much as memory; None where the model does not say
    beyond_trained: bool | None = None
    device_kv_bytes: int | None = None  # the part of kv_bytes on the device (CacheStats.device_kv_bytes)
    # what the context held (mukv.report.recall.pack_recalled of its ``Recalled``): in predictions.jsonl only
    recalled: dict[str, Any] | None = None

    def row(self) -> dict[str, Any]:
        """A flat row; ``meta`` (keys vary by question type) stays one JSON column."""
        d = asdict(self)
        d["meta"] = json.dumps(d["meta"], sort_keys=True, default=str)
        return d


@dataclass
class VideoRecord:
    """One row of memory_stats.csv."""

    video_id: str
    method: str
    frames_encoded: int
    questions: int
    kv_tokens: int
    kv_bytes: int
    peak_kv_bytes: int
    aux_bytes: int
    encode_s: float
    encode_fps: float
    peak_rss_bytes: int
    peak_cuda_bytes: int
    error: str = ""


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (VmHWM), 0 where /proc is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class StreamingEngine:
    """Streams videos through a cache method and answers their questions."""

    def __init__(self, llm: VideoLLM, method: CacheMethod, settings: EngineSettings) -> None:
        self.llm, self.method, self.settings = llm, method, settings
        check_chunk(settings.encode_chunk_size, llm.geometry, llm.name)
        compile_mode = CompileMode(settings.compile)
        if compile_mode != CompileMode.none:
            llm.compile(compile_mode.torch_mode)
        method.bind(llm)
        self._sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)

    # ------------------------------------------------------------------------------------ answering
    @torch.inference_mode()
    def answer(self, question: str) -> tuple[Answer, AnswerContext, float]:
        """Recall a context for ``question`` and decode greedily; returns (answer, context, recall_s)."""
        t0 = time.perf_counter()
        context = self.method.recall(question)
        self._sync()
        recall_s = time.perf_counter() - t0
        prompt = self.llm.question_prompt_ids(question)
        attend = decode_attention(context, self.llm, reserve=len(prompt) + self.settings.max_new_tokens)
        t1 = time.perf_counter()
        logits = self.llm.logits(self.llm.forward(self.llm.embed_ids(prompt), attend)[:, -1])[0]
        self._sync()
        t2 = time.perf_counter()
        first_logits, tokens = logits.clone(), []
        for _ in range(self.settings.max_new_tokens):
            token_t = logits.argmax()
            token = int(token_t)
            tokens.append(token)
            if token in self.llm.eos_token_ids or len(tokens) == self.settings.max_new_tokens:
                break
            # embedded from the device's copy of the token: no host-to-device copy per token
            logits = self.llm.logits(self.llm.forward(self.llm.embed_ids(token_t.view(1)), attend)[:, -1])[0]
        self._sync()
        t3 = time.perf_counter()
        style = self.settings.answer_text
        text = answer_text(self.llm, tokens, self.method.published_answer_text if style == "auto" else style)
        self.method.observe_answer(question, text)
        return Answer(text, tokens, first_logits, t2 - t1, t3 - t2), context, recall_s

    # ------------------------------------------------------------------------------------ streaming
    def encode_until(self, sample: VideoSample, done: int, need: int, bar: tqdm | None) -> int:
        """Encode frames done..need-1 in chunks; returns the new number of frames encoded. A model that embeds
        several frames per step (Qwen-VL: 2) gets whole steps: a last frame without its pair waits for it, and
        the method counts steps (``first_frame`` of ``ingest``)."""
        step = self.llm.geometry.frames_per_step
        need -= need % step
        for first, frames in iter_chunks(sample.source, done, need, self.settings.encode_chunk_size):
            visual = self.llm.encode_frames(frames)
            self.method.ingest(visual, first // step)
            done = self._done = first + len(frames)
            self._peak_kv = max(self._peak_kv, self.method.stats().kv_bytes)
            if bar is not None:
                bar.update(len(frames))
        return done

    @torch.inference_mode()
    def run_video(self, sample: VideoSample, on_answer: Callable[[AnswerRecord], None],
                  skip: Iterable[str] = ()) -> VideoRecord:
        """Stream one video, answering every question not in ``skip``; each answer goes to ``on_answer``.

        The video is streamed up to its last question even when every question is in ``skip`` (a run killed
        after a video's last answer, before its memory row), so that the record (frames, KV, peak) is that
        of an uninterrupted run; ``questions`` counts the video's answered questions, before a resume too.
        A ``MukvError`` while streaming carries the record of what was done until then (``video_record``,
        with the error) for the caller to write."""
        skip = set(skip)
        if self.llm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._peak_kv = self._done = 0
        self.method.start_video(self.llm.init_prompt_ids())
        questions = sorted(sample.questions, key=lambda q: q.end_time)
        last_needed = frames_until(sample.source, questions[-1].end_time) if questions else 0
        show = self.settings.progress
        frame_bar = tqdm(total=last_needed, desc=f"{sample.video_id} frames", unit="fr", leave=False,
                         disable=not show)
        q_bar = tqdm(total=len(questions), desc=f"{sample.video_id} questions", unit="q", leave=False,
                     disable=not show)
        encode_total, answered = 0.0, 0
        try:
            for q in questions:
                t0 = time.perf_counter()
                # Encode segment by segment even for questions answered before a resume, so that the
                # chunk boundaries (which some methods depend on) are those of an uninterrupted run.
                try:
                    self.encode_until(sample, self._done, frames_until(sample.source, q.end_time), frame_bar)
                    self._sync()
                finally:
                    encode_s = time.perf_counter() - t0
                    encode_total += encode_s
                if q.qid not in skip:
                    on_answer(self._answer_record(sample, q, self._done, encode_s))
                answered += 1  # answered now, or before a resume
                q_bar.update(1)
        except MukvError as err:
            err.video_record = self._video_record(sample, answered, encode_total, error=str(err))
            raise
        finally:
            frame_bar.close()
            q_bar.close()
        return self._video_record(sample, answered, encode_total)

    def _video_record(self, sample: VideoSample, questions: int, encode_s: float, error: str = "") -> VideoRecord:
        stats = self.method.stats()
        done = self._done
        return VideoRecord(
            video_id=sample.video_id, method=self.method.name, frames_encoded=done, questions=questions,
            kv_tokens=stats.kv_tokens, kv_bytes=stats.kv_bytes, peak_kv_bytes=max(self._peak_kv, stats.kv_bytes),
            aux_bytes=stats.aux_bytes, encode_s=encode_s, encode_fps=done / encode_s if encode_s else 0.0,
            peak_rss_bytes=peak_rss_bytes(),
            peak_cuda_bytes=torch.cuda.max_memory_allocated() if self.llm.device.type == "cuda" else 0, error=error,
        )

    def _answer_record(self, sample: VideoSample, q: Question, frames_seen: int, encode_s: float) -> AnswerRecord:
        answer, context, recall_s = self.answer(q.question)
        stats, geo = self.method.stats(), self.llm.geometry
        return AnswerRecord(
            video_id=sample.video_id, qid=q.qid, question=q.question, answer=q.answer, prediction=answer.text,
            start_time=q.start_time, end_time=q.end_time, qtype=q.qtype, method=self.method.name,
            frames_seen=frames_seen, online_tokens=context.online_tokens, kv_tokens=stats.kv_tokens,
            kv_bytes=stats.kv_bytes, encode_s=encode_s, recall_s=recall_s, ttft_s=recall_s + answer.prefill_s,
            latency_s=recall_s + answer.prefill_s + answer.decode_s, new_tokens=len(answer.token_ids),
            meta=dict(q.meta),
            evidence_recalled=evidence_recalled(q.meta, context.recalled.tokens, self.llm.geometry.tokens_per_frame,
                                                context.recalled.frames, self.llm.geometry.frames_per_step),
            answer_position=context.next_position,
            beyond_trained=(None if self.llm.trained_positions is None
                            else context.next_position > self.llm.trained_positions),
            device_kv_bytes=stats.device_kv_bytes,
            recalled=pack_recalled(context.recalled, geo.tokens_per_frame, getattr(geo, "frames_per_step", 1),
                                   getattr(geo, "grid", None)),
        )
