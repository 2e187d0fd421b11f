"""A live demo: stream a video through a model and a cache method, and ask a question at any moment.

    make demo                                                  # nano model, full cache, a synthetic stream
    python -m mukv.demo cache=mukv budget_frames=8              # Hydra overrides, as mukv.run takes them
    python -m mukv.demo model=llava_ov_0.5b --video clip.mp4 --port 7861
    python -m mukv.demo --video webcam                          # where the browser has a camera

A local web app (Gradio) at http://127.0.0.1:7860: the stream plays (``Play`` / ``Pause``, or ``Step``), frames
are encoded and handed to the cache method as they come (``ingest``), and a question typed at any moment is
answered from what the method recalls (``recall``) by the engine's decoder: the page shows the answer, the time
to first token, the KV bytes held and the frames and patches the context held, drawn as in the run explorer
(``mukv.report.explorer``). On the synthetic stream the benchmark's own questions can be asked at their time,
with their reference and evidence. It runs with the nano model on a CPU as it is.

Everything but the web page is :class:`DemoSession` (tests drive it directly, and the app through its HTTP
API: ``/start``, ``/step``, ``/ask``, ``/ask_benchmark``). One session is shared by every browser tab.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mukv.errors import ConfigError, MukvError
from mukv.report.explorer import (
    RunView,
    collect_questions,
    frames_figure,
    recall_strip_figure,
    shown_frames,
    thumbnail,
    typed_answer,
)
from mukv.report.recall import pack_recalled

ROOT = Path(__file__).resolve().parents[1]
# the demo's own defaults (a command line's overrides come after them): one synthetic stream of two minutes
DEMO_DEFAULTS = ("dataset.synthetic.num_videos=1", "dataset.synthetic.duration_s=120",
                 "dataset.synthetic.questions_per_video=6", "engine.max_new_tokens=16", "engine.progress=false")
MAX_THUMBNAILS = 5000  # frames whose picture the session keeps (a camera's oldest are dropped)


def compose(overrides: Sequence[str]):
    """``conf/eval.yaml`` with the demo's defaults and ``overrides`` (Hydra's compose API, the same schemas and
    checks as ``python -m mukv.run``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mukv.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("eval", overrides=[*DEMO_DEFAULTS, *overrides])
    cfg.paths.root_dir = str(ROOT)
    cfg.paths.output_dir = str(ROOT / "outputs" / "demo")  # never written: the demo keeps nothing
    return cfg


@dataclass
class Asked:
    """One answered question of the live stream."""

    question: str
    answer: str
    at_s: float
    frames_seen: int
    ttft_s: float
    latency_s: float
    kv_bytes: int
    device_kv_bytes: int
    online_tokens: int
    recalled: dict[str, Any] | None
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    evidence_recalled: float | None = None

    def summary(self) -> dict[str, Any]:
        from mukv.report.recall import RecallMap

        rm = RecallMap.unpack(self.recalled)
        return {"question": self.question, "answer": self.answer, "reference": self.reference,
                "asked_at_s": self.at_s, "frames_seen": self.frames_seen, "ttft_s": round(self.ttft_s, 4),
                "latency_s": round(self.latency_s, 4), "kv_bytes": self.kv_bytes,
                "device_kv_bytes": self.device_kv_bytes, "online_tokens": self.online_tokens,
                "recalled_frames": None if rm is None else rm.frames(),
                "evidence_recalled": self.evidence_recalled}


class DemoSession:
    """A model, a cache method and a stream: ``start`` one, ``step`` it, ``ask`` it (thread-safe)."""

    def __init__(self, overrides: Sequence[str] = ()) -> None:
        from mukv.models.loading import model_loader

        self.overrides = list(overrides)
        self.cfg = compose(self.overrides)
        self.lock = threading.RLock()
        self.loader = model_loader(self.cfg.model)
        self.llm = self.loader.load(self.cfg.model)  # once: every start reuses it
        self.engine = self.method = self.source = None
        self.video_id, self.questions = "", []
        self.fps = float(self.cfg.dataset.sample_fps)
        self.reset_stream()

    # -------------------------------------------------------------------------------------- the stream
    def reset_stream(self) -> None:
        self.done = 0  # frames encoded
        self.pending: list[np.ndarray] = []  # frames waiting for a whole step of the model (Qwen-VL: 2)
        self.thumbs: dict[int, tuple[str, tuple[int, int]]] = {}
        self.history: list[dict[str, float]] = []  # per encoded chunk: time, KV bytes, device bytes, s per frame
        self.asked: list[Asked] = []
        self.last_frame: np.ndarray | None = None

    def start(self, cache: str | None = None, video: str = "synthetic", budget_frames: int | None = None) -> str:
        """A new stream of ``video`` (``synthetic``, ``webcam`` or a file) through cache method ``cache`` (default:
        the configured one) with an optional frame budget; returns a status line."""
        from mukv.cache.base import CACHE_METHODS
        from mukv.engine import EngineSettings, StreamingEngine
        from mukv.train_eval import apply_budget, build_method

        overrides = list(self.overrides)
        if cache:
            if cache not in CACHE_METHODS:
                raise ConfigError("cache", f"unknown cache method {cache!r}; choose one of {', '.join(CACHE_METHODS)}")
            overrides.append(f"cache={cache}")
        if budget_frames:
            overrides.append(f"budget_frames={int(budget_frames)}")
        with self.lock:
            cfg = compose(overrides)
            geometry = self.llm.geometry
            apply_budget(cfg, geometry.tokens_per_frame)
            method = build_method(cfg.cache)
            method.validate(geometry)
            from omegaconf import OmegaConf

            engine = StreamingEngine(self.llm, method, EngineSettings(**OmegaConf.to_container(cfg.engine,
                                                                                              resolve=True)))
            opened = self._open(video or "synthetic", cfg)  # a file that does not open leaves the stream as it was
            self.engine, self.method, self.cfg = engine, method, cfg
            self.fps = float(cfg.dataset.sample_fps)
            self.source, self.video_id, self.questions = opened
            self.reset_stream()
            method.start_video(self.llm.init_prompt_ids())
            return self.status()

    def _open(self, video: str, cfg) -> tuple[Any, str, list]:
        if video == "webcam":
            return None, "webcam", []
        if video == "synthetic":
            from mukv.data.datasets import dataset_class

            ds = cfg.dataset
            if dataset_class(ds).kind != "synthetic":
                raise ConfigError("--video", "video=synthetic needs dataset=synthetic (or give a file)")
            sample = dataset_class(ds).load(ds)[0]
            return sample.source, sample.video_id, sorted(sample.questions, key=lambda q: q.end_time)
        from mukv.video.sources import open_video

        return open_video(video, float(cfg.dataset.sample_fps)), Path(video).name, []

    def step(self, frames: int = 1) -> str:
        """Stream ``frames`` more frames of a file or synthetic source (fewer at its end); returns the status."""
        with self.lock:
            self._need_stream()
            if self.source is not None:
                stop = min(len(self.source), self.done + len(self.pending) + int(frames))
                start = self.done + len(self.pending)
                if stop > start:
                    self._encode(self.source.frames(start, stop))
            return self.status()

    def push(self, frame: np.ndarray) -> str:
        """One frame from a live camera (uint8 RGB), encoded as it comes."""
        with self.lock:
            self._need_stream()
            self._encode(np.asarray(frame, dtype=np.uint8)[None, ..., :3])
            return self.status()

    def advance_to(self, t: float) -> str:
        """Stream until time ``t`` (seconds) of the source (the frames a question at ``t`` sees)."""
        from mukv.data.types import frames_until

        with self.lock:
            self._need_stream()
            need = frames_until(self.source, t) if self.source is not None else 0
            return self.step(max(0, need - self.done - len(self.pending)))

    def _need_stream(self) -> None:
        if self.engine is None:
            raise MukvError("no stream yet: start one first")

    def _encode(self, frames: np.ndarray) -> None:
        step = getattr(self.llm.geometry, "frames_per_step", 1)
        self.pending.extend(frames)
        whole = len(self.pending) - len(self.pending) % step
        if whole == 0:
            return
        batch, self.pending = np.stack(self.pending[:whole]), self.pending[whole:]
        t0 = time.perf_counter()
        import torch

        with torch.inference_mode():
            visual = self.llm.encode_frames(batch)
            self.method.ingest(visual, self.done // step)
        dt = time.perf_counter() - t0
        for i, frame in enumerate(batch):
            self.thumbs[self.done + i] = thumbnail(frame)
        for old in range(self.done - MAX_THUMBNAILS, self.done + len(batch) - MAX_THUMBNAILS):
            self.thumbs.pop(old, None)  # a camera streams for ever: the oldest pictures go (their recall stays)
        self.done += len(batch)
        self.last_frame = batch[-1]
        stats = self.method.stats()
        self.history.append({"t": self.done / self.fps, "kv_bytes": stats.kv_bytes,
                             "device_kv_bytes": stats.device_kv_bytes, "s_per_frame": dt / len(batch)})

    def status(self) -> str:
        if self.method is None:
            return "no stream"
        stats = self.method.stats()
        total = len(self.source) if self.source is not None else None
        return (f"{self.method.name} on {self.video_id}: {self.done} frames streamed"
                f"{'' if total is None else f' of {total}'} ({self.done / self.fps:g} s) · KV held "
                f"{stats.kv_bytes / 2**20:.2f} MiB ({stats.kv_tokens} tokens), on the device "
                f"{stats.device_kv_bytes / 2**20:.2f} MiB")

    # ------------------------------------------------------------------------------------------ asking
    def ask(self, question: str, reference: str | None = None, meta: dict[str, Any] | None = None) -> Asked:
        """Answer ``question`` now, from what the method recalls (the stream goes on afterwards)."""
        from mukv.report.evidence import evidence_recalled

        question = (question or "").strip()
        if not question:
            raise MukvError("type a question first")
        with self.lock:
            self._need_stream()
            answer, context, recall_s = self.engine.answer(question)
            stats, geo = self.method.stats(), self.llm.geometry
            k = getattr(geo, "frames_per_step", 1)
            asked = Asked(
                question=question, answer=answer.text.strip(), at_s=self.done / self.fps, frames_seen=self.done,
                ttft_s=recall_s + answer.prefill_s, latency_s=recall_s + answer.prefill_s + answer.decode_s,
                kv_bytes=stats.kv_bytes, device_kv_bytes=stats.device_kv_bytes, online_tokens=context.online_tokens,
                recalled=pack_recalled(context.recalled, geo.tokens_per_frame, k, getattr(geo, "grid", None)),
                reference=reference, meta=dict(meta or {}),
                evidence_recalled=evidence_recalled(meta or {}, context.recalled.tokens, geo.tokens_per_frame,
                                                    context.recalled.frames, **({"frames_per_step": k} if k != 1 else {})))
            self.asked.append(asked)
            return asked

    def benchmark_questions(self) -> list[str]:
        """The synthetic stream's own questions, as '<qid>: <question> (at <t> s)'."""
        return [f"{q.qid}: {q.question} (at {q.end_time:g} s)" for q in self.questions]

    def ask_benchmark(self, choice: str) -> Asked:
        """Stream to the time of one of the synthetic stream's questions (``qid`` or a ``benchmark_questions``
        entry) and ask it, with its reference and evidence."""
        qid = (choice or "").split(":", 1)[0].strip()
        q = next((q for q in self.questions if q.qid == qid), None)
        if q is None:
            raise MukvError(f"no benchmark question {qid!r} in this stream (a synthetic stream has them)")
        with self.lock:
            if self.done > int(q.end_time * self.fps):
                raise MukvError(f"{qid} is asked at {q.end_time:g} s and the stream is past it: start again")
            self.advance_to(q.end_time)
            return self.ask(q.question, reference=q.answer, meta=dict(q.meta))

    # ------------------------------------------------------------------------------------------ figures
    def _view(self, asked: Asked) -> tuple[dict[str, Any], RunView]:
        row = {"video_id": self.video_id, "qid": f"live{len(self.asked)}", "question": asked.question,
               "answer": asked.reference or "", "prediction": asked.answer, "end_time": asked.at_s,
               "frames_seen": asked.frames_seen, "qtype": "live" if asked.reference is None else "benchmark",
               "judge_correct": None if asked.reference is None else asked.answer == asked.reference,
               "meta": asked.meta, "recalled": asked.recalled, "method": self.method.name,
               "evidence_recalled": asked.evidence_recalled}
        run = RunView(Path("live"), self.method.name, {"dataset": {"sample_fps": self.fps}}, {},
                      {(self.video_id, row["qid"]): typed_answer(row)}, [])
        questions, _ = collect_questions([run])
        return next(iter(questions.values())), run

    def figures(self, asked: Asked) -> tuple[dict[str, Any], dict[str, Any]]:
        """(frames with the recalled tokens, recall strip) of an answer, as plotly figure dicts."""
        q, run = self._view(asked)
        frames = shown_frames(q, [run])
        fig = frames_figure(q, [run], frames, lambda v, f: self.thumbs.get(f))
        return fig, recall_strip_figure(q, [run])

    def memory_figure(self) -> dict[str, Any]:
        h = self.history
        t = [x["t"] for x in h]
        line = {"type": "scatter", "mode": "lines", "x": t}
        return {"data": [{**line, "name": "KV MiB held", "y": [x["kv_bytes"] / 2**20 for x in h]},
                         {**line, "name": "on the device", "y": [x["device_kv_bytes"] / 2**20 for x in h],
                          "line": {"dash": "dot"}},
                         {**line, "name": "encode s / frame", "y": [x["s_per_frame"] for x in h], "yaxis": "y2"}],
                "layout": {"height": 300, "margin": {"l": 60, "r": 60, "t": 30, "b": 40},
                           "xaxis": {"title": {"text": "stream time (s)"}},
                           "yaxis": {"title": {"text": "MiB"}, "rangemode": "tozero"},
                           "yaxis2": {"title": {"text": "s / frame"}, "overlaying": "y", "side": "right",
                                      "rangemode": "tozero"},
                           "legend": {"orientation": "h", "y": 1.15}}}


# ------------------------------------------------------------------------------------------------ the app
def build_app(session: DemoSession, frames_per_tick: int = 2, tick_s: float = 1.0):
    """The Gradio Blocks app over ``session`` (its events are the HTTP API: /start, /step, /ask, /ask_benchmark)."""
    import gradio as gr
    import plotly.graph_objects as go

    from mukv.cache.base import ordered_methods

    def fig(d: dict[str, Any]):
        return go.Figure(d)

    def frame_image():
        return session.last_frame

    def on_start(cache, video, budget):
        try:
            status = session.start(cache, video, int(budget) if budget else None)
        except Exception as err:  # noqa: BLE001 - a bad path or override is told on the page, the app goes on
            raise gr.Error(f"{type(err).__name__}: {err}") from err
        choices = session.benchmark_questions()
        return (status, frame_image(), fig(session.memory_figure()),
                gr.update(choices=choices, value=choices[0] if choices else None), video == "webcam")

    def on_step(n):
        try:
            status = session.step(int(n or 1))
        except MukvError as err:
            raise gr.Error(str(err)) from err
        return status, frame_image(), fig(session.memory_figure())

    def on_tick(playing, n):
        if not playing or session.engine is None or session.source is None:
            return gr.update(), gr.update(), gr.update()
        return on_step(n)

    def on_push(frame):
        if frame is None or session.engine is None or session.video_id != "webcam":
            return gr.update(), gr.update()
        return session.push(frame), fig(session.memory_figure())

    def answered(asked: Asked):
        frames, strip = session.figures(asked)
        ref = "" if asked.reference is None else f" · reference **{asked.reference}**"
        text = (f"**{asked.answer or '(empty)'}**{ref} · at {asked.at_s:g} s · TTFT {asked.ttft_s * 1000:.0f} ms · "
                f"KV held {asked.kv_bytes / 2**20:.2f} MiB · {asked.online_tokens} online tokens")
        strip["layout"]["height"] = max(strip["layout"]["height"], 260)
        return text, asked.summary(), fig(frames), fig(strip), session.status(), fig(session.memory_figure())

    def on_ask(question):
        try:
            return answered(session.ask(question))
        except MukvError as err:
            raise gr.Error(str(err)) from err

    def on_ask_benchmark(choice):
        try:
            return answered(session.ask_benchmark(choice))
        except MukvError as err:
            raise gr.Error(str(err)) from err

    methods = ordered_methods()
    with gr.Blocks(title="mukv live demo", analytics_enabled=False) as app:
        gr.Markdown("## mukv: ask a streaming video\nStart a stream, let it play, type a question at any moment.")
        with gr.Row():
            cache = gr.Dropdown(methods, value=session.method.name if session.method else methods[0], label="cache method")
            video = gr.Textbox("synthetic", label="video: synthetic, webcam, or a file path (mp4, npy)")
            budget = gr.Number(0, label="budget_frames (0: the method's own knobs)", precision=0)
            start = gr.Button("Start", variant="primary")
        status = gr.Markdown("no stream")
        with gr.Row():
            with gr.Column(scale=1):
                current = gr.Image(label="current frame", interactive=False, height=240)
                camera = gr.Image(sources=["webcam"], streaming=True, label="webcam", visible=False)
                with gr.Row():
                    playing = gr.Checkbox(False, label="play")
                    per_tick = gr.Number(frames_per_tick, label=f"frames per {tick_s:g} s", precision=0)
                    step = gr.Button("Step")
            with gr.Column(scale=2):
                memory = gr.Plot(label="memory and encode time along the stream")
        with gr.Row():
            question = gr.Textbox(label="question", placeholder="What colour was the star?", scale=3)
            ask = gr.Button("Ask now", variant="primary", scale=1)
        with gr.Row():
            bench = gr.Dropdown([], label="or a question of the synthetic benchmark (streams to its time)", scale=3,
                                allow_custom_value=True)  # its qid alone will do (the API)
            ask_bench = gr.Button("Ask at its time", scale=1)
        answer = gr.Markdown()
        info = gr.JSON(label="answer record")
        frames = gr.Plot(label="frames the context held (dimmed: not recalled; evidence outlined)")
        strip = gr.Plot(label="recalled share of each frame")
        webcam_on = gr.State(False)

        start.click(on_start, [cache, video, budget], [status, current, memory, bench, webcam_on], api_name="start")
        webcam_on.change(lambda on: gr.update(visible=bool(on)), webcam_on, camera, api_visibility="private")
        step.click(on_step, per_tick, [status, current, memory], api_name="step")
        gr.Timer(tick_s).tick(on_tick, [playing, per_tick], [status, current, memory], api_visibility="private")
        camera.stream(on_push, camera, [status, memory], stream_every=1.0, api_visibility="private")
        outs = [answer, info, frames, strip, status, memory]
        ask.click(on_ask, question, outs, api_name="ask")
        question.submit(on_ask, question, outs, api_visibility="private")
        ask_bench.click(on_ask_benchmark, bench, outs, api_name="ask_benchmark")
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mukv.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as python -m mukv.run takes them "
                                                     "(model=..., cache=..., budget_frames=N, dataset.synthetic.seed=N)")
    parser.add_argument("--video", default="synthetic", help="synthetic (default), webcam, or an mp4 / npy path")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--frames-per-tick", type=int, default=2, help="frames streamed per second while playing")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: nothing leaves the machine
    try:
        session = DemoSession(args.overrides)
        session.start(video=args.video)
    except MukvError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(session.status())
    build_app(session, args.frames_per_tick).launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
