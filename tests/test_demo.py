"""The live demo (`make demo`, issue #29): a question's round trip through the session and through the Gradio
app's HTTP API (its Python client, the server on a free local port), on the nano model and a synthetic stream."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: nothing leaves the machine

# one short stream whose detail needle is shown early (a 2-frame window has lost it by the question)
OVERRIDES = ["dataset.synthetic.duration_s=40", "dataset.synthetic.questions_per_video=2",
             "dataset.synthetic.question_types=[detail,current]", "dataset.synthetic.needle_depth=0.1"]


@pytest.fixture(scope="module")
def session():
    from mukv.demo import DemoSession

    return DemoSession(OVERRIDES)


def detail_qid(session) -> str:
    return next(q.qid for q in session.questions if q.qtype == "detail")


def test_session_answers_a_question_at_its_time_and_shows_what_it_recalled(session):
    import plotly.graph_objects as go

    session.start("full", "synthetic")
    qid = detail_qid(session)
    q = next(q for q in session.questions if q.qid == qid)
    asked = session.ask_benchmark(qid)
    needle = q.meta["needle_frame"]
    assert asked.answer == q.answer and asked.evidence_recalled == 1.0  # the nano model in range, full cache
    assert asked.frames_seen == int(q.end_time * session.fps) and asked.ttft_s > 0 and asked.kv_bytes > 0
    assert needle in asked.summary()["recalled_frames"]
    frames, strip = session.figures(asked)
    go.Figure(frames), go.Figure(strip), go.Figure(session.memory_figure())
    (panel,) = [p for p in frames["layout"]["meta"]["panels"] if p["frame"] == needle]
    assert panel["evidence_cells"] == [q.meta["needle_cell"]] and panel["recalled"] == 1.0
    assert any(t["type"] == "image" and t["source"].startswith("data:image/jpeg;base64,") for t in frames["data"])
    later = session.ask("What colour was the star?")  # a free question, now: the stream is where it was
    assert later.frames_seen == asked.frames_seen and later.reference is None
    assert len(session.history) >= 1 and session.history[-1]["kv_bytes"] == asked.kv_bytes

    session.start("sliding_window", "synthetic", budget_frames=2)  # the window has lost the needle by then
    missed = session.ask_benchmark(qid)
    assert missed.evidence_recalled == 0.0 and needle not in missed.summary()["recalled_frames"]
    assert missed.kv_bytes < asked.kv_bytes


def test_session_refuses_what_it_cannot_do(session):
    from mukv.errors import ConfigError, MukvError

    with pytest.raises(ConfigError, match="unknown cache method"):
        session.start("no_such_method")
    session.start("full", "synthetic")
    session.step(2)
    with pytest.raises(MukvError, match="not found"):
        session.start("mukv", "/no/such/clip.mp4")
    assert session.method.name == "full" and session.done == 2  # the stream goes on as it was
    with pytest.raises(MukvError, match="type a question"):
        session.ask("  ")
    session.step(40)
    with pytest.raises(MukvError, match="past it"):
        session.ask_benchmark(detail_qid(session))


def test_session_streams_a_video_file(session, tmp_path):
    import numpy as np

    from mukv.video.sources import write_mp4

    frames = np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    write_mp4(tmp_path / "clip.mp4", frames, fps=1)
    assert "clip.mp4: 0 frames streamed of 4" in session.start("sliding_window", str(tmp_path / "clip.mp4"))
    session.step(3)  # at sample_fps 0.5: every other frame of the 1-fps file
    asked = session.ask("What colour was the star?")
    assert asked.frames_seen == 3 and set(session.thumbs) == {0, 1, 2}
    assert asked.summary()["recalled_frames"] == [0, 1, 2] and asked.evidence_recalled is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_question_round_trip_through_its_http_api(session):
    from gradio_client import Client

    from mukv.demo import build_app

    app = build_app(session)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert set(endpoints) == {"/start", "/step", "/ask", "/ask_benchmark"}
        status, *_ = client.predict("full", "synthetic", 0, api_name="/start")
        assert status.startswith("full on syn-s0-v0000: 0 frames streamed of 20")
        status, *_ = client.predict(3, api_name="/step")
        assert "3 frames streamed" in status
        text, record, frames, strip, status, memory = client.predict(detail_qid(session), api_name="/ask_benchmark")
        q = next(q for q in session.questions if q.qid == detail_qid(session))
        assert record["answer"] == record["reference"] == q.answer and record["evidence_recalled"] == 1.0
        assert record["ttft_s"] > 0 and record["kv_bytes"] > 0 and q.meta["needle_frame"] in record["recalled_frames"]
        assert f"**{q.answer}**" in text and "TTFT" in text and "KV held" in text
        _, record, *_ = client.predict("How many rings have appeared so far?", api_name="/ask")
        assert record["answer"] and record["reference"] is None and record["frames_seen"] == int(q.end_time / 2)
    finally:
        app.close()
