"""Datasets: the real RVS annotation files, malformed records, and the synthetic stream's exact answers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mukv.data import (
    LazySource,
    SyntheticSpec,
    export_synthetic,
    load_rvs_annotations,
    make_synthetic_dataset,
    render_frame,
    resolve_video_path,
)
from mukv.data.synthetic import (
    CHANCE,
    COLOURS,
    COUNT_SHAPE,
    DIRECTIONS,
    GRID,
    MOTION_SHAPE,
    NEEDLE_SHAPES,
    OBJECT_SHAPES,
    QUESTION_TYPES,
    SHAPES,
    TRAIN_SEED_BASE,
    Scene,
    SyntheticVideoSource,
    cell_center,
    cell_size,
    make_video,
    shape_mask,
)
from mukv.data.types import VideoSample, frames_until
from mukv.errors import ConfigError, DataError, VideoError

# CI clones the project with shared/ beside it; a missing folder is a broken checkout, not a reason to skip.
SHARED = Path(__file__).resolve().parents[2] / "shared"
RVS_FILES = [("ego4d_oe.json", 10, 1465), ("movienet_oe.json", 22, 1905)]


@pytest.fixture(scope="module")
def rvs_dir() -> Path:
    d = SHARED / "data" / "rvs"
    if not d.is_dir():
        pytest.fail(f"shared RVS annotations not found at {d} (expected ../shared beside the repository)")
    return d


# ------------------------------------------------------------------------------------------------- RVS real


@pytest.mark.parametrize("name, n_videos, n_questions", RVS_FILES)
def test_real_rvs_files_parse_completely(
    rvs_dir: Path, tmp_path: Path, name: str, n_videos: int, n_questions: int
) -> None:
    samples = load_rvs_annotations(rvs_dir / name, data_root=tmp_path, sample_fps=0.5)
    assert len(samples) == n_videos
    assert sum(len(s.questions) for s in samples) == n_questions
    raw = json.loads((rvs_dir / name).read_text())
    qids = set()
    for sample, record in zip(samples, raw, strict=False):
        assert sample.video_id == record["video_id"] and sample.duration == float(record["duration"])
        ends = [q.end_time for q in sample.questions]
        assert ends == sorted(ends)
        assert all(
            isinstance(q.start_time, float) and isinstance(q.end_time, float) for q in sample.questions
        )
        assert all(q.qtype is None for q in sample.questions)
        qids |= {q.qid for q in sample.questions}
        # /data/rvs/... resolves under the data root; nothing was opened
        rest = record["video_path"].removeprefix("/data/rvs/")
        assert Path(sample.meta["video_path"]) == tmp_path / rest
        assert isinstance(sample.source, LazySource) and not sample.source.is_open
        assert sample.source.sample_fps == 0.5
        if "clip_start_time" in record:
            assert sample.meta["clip_start_time"] == record["clip_start_time"]
    assert len(qids) == n_questions


def test_real_rvs_check_videos_lists_missing(rvs_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(VideoError, match=r"10 of 10 videos.*not found.*\.\.\. and 7 more"):
        load_rvs_annotations(rvs_dir / "ego4d_oe.json", tmp_path, 0.5, check_videos=True)
    ok = load_rvs_annotations(rvs_dir / "ego4d_oe.json", tmp_path, 0.5, limit_videos=0, check_videos=True)
    assert ok == []


def test_real_rvs_selection(rvs_dir: Path, tmp_path: Path) -> None:
    path = rvs_dir / "movienet_oe.json"
    assert [s.video_id for s in load_rvs_annotations(path, tmp_path, 1.0, limit_videos=2)] == [
        "tt0067116",
        "tt0076759",
    ]
    picked = load_rvs_annotations(path, tmp_path, 1.0, video_ids=["tt0084726", "tt0067116"])
    assert [s.video_id for s in picked] == ["tt0067116", "tt0084726"]  # file order
    with pytest.raises(DataError, match="tt9999999"):
        load_rvs_annotations(path, tmp_path, 1.0, video_ids=["tt9999999"])


def test_resolve_video_path(tmp_path: Path) -> None:
    assert resolve_video_path("/data/rvs/ego/videos/a.mp4", tmp_path) == tmp_path / "ego/videos/a.mp4"
    assert resolve_video_path("movie/b.npy", tmp_path) == tmp_path / "movie/b.npy"
    assert resolve_video_path("/elsewhere/c.mp4", tmp_path) == Path("/elsewhere/c.mp4")
    assert resolve_video_path("/mnt/x/c.mp4", tmp_path, prefix="/mnt/x/") == tmp_path / "c.mp4"
    assert resolve_video_path("/data/rvsx/c.mp4", tmp_path) == Path(
        "/data/rvsx/c.mp4"
    )  # a prefix of components


# -------------------------------------------------------------------------------------------- RVS malformed


def good_records() -> list[dict[str, Any]]:
    return [
        {
            "video_id": "v1",
            "video_path": "/data/rvs/ego/videos/v1.npy",
            "duration": 20.0,
            "conversations": [
                {"question": "What is first?", "answer": "A cat.", "start_time": 0, "end_time": 5},
                {"question": "What is next?", "answer": "A dog.", "start_time": 2, "end_time": 12},
            ],
        },
        {
            "video_id": "v2",
            "video_path": "movie/v2.npy",
            "duration": 10,
            "clip_start_time": 1,
            "clip_end_time": 9,
            "conversations": [{"question": "Who?", "answer": "Me.", "end_time": 9}],
        },
    ]


def write_json(tmp_path: Path, data: Any, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def conv(i: int = 1) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    return lambda d: d[0]["conversations"][i]


MALFORMED: list[tuple[str, Callable[[list[dict[str, Any]]], Any], str]] = [
    ("missing video_id", lambda d: d[0].pop("video_id"), "video_id"),
    ("missing video_path", lambda d: d[1].pop("video_path"), "video_path"),
    ("missing duration", lambda d: d[0].pop("duration"), "duration"),
    ("missing conversations", lambda d: d[0].pop("conversations"), "conversations"),
    ("missing question", lambda d: conv()(d).pop("question"), "conversations[1].question"),
    ("missing answer", lambda d: conv()(d).pop("answer"), "conversations[1].answer"),
    ("missing end_time", lambda d: conv()(d).pop("end_time"), "conversations[1].end_time"),
    ("negative start", lambda d: conv()(d).update(start_time=-1), "conversations[1].start_time"),
    ("negative duration", lambda d: d[0].update(duration=-5), "duration"),
    ("string time", lambda d: conv()(d).update(end_time="12"), "conversations[1].end_time"),
    ("bool time", lambda d: conv()(d).update(end_time=True), "conversations[1].end_time"),
    ("nan time", lambda d: conv()(d).update(end_time=float("nan")), "conversations[1].end_time"),
    ("empty question", lambda d: conv()(d).update(question="   "), "conversations[1].question"),
    ("end past duration", lambda d: conv()(d).update(end_time=21.5), "conversations[1].end_time"),
    ("start after end", lambda d: conv()(d).update(start_time=13), "conversations[1].start_time"),
    ("record not object", lambda d: d.__setitem__(1, ["v2"]), "record 1"),
    ("question not object", lambda d: d[0]["conversations"].__setitem__(0, "q"), "conversations[0]"),
    ("conversations not list", lambda d: d[0].update(conversations={}), "conversations"),
    ("duplicate id", lambda d: d[1].update(video_id="v1"), "video_id"),
    ("empty video_id", lambda d: d[1].update(video_id=""), "video_id"),
]


@pytest.mark.parametrize("mutate, field", [(m, f) for _, m, f in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_records_name_file_and_field(
    tmp_path: Path, mutate: Callable[..., Any], field: str
) -> None:
    data = good_records()
    mutate(data)
    path = write_json(tmp_path, data, "broken_ann.json")
    with pytest.raises(DataError) as err:
        load_rvs_annotations(path, tmp_path, 1.0)
    message = str(err.value)
    assert "broken_ann.json" in message and field in message, message


def test_malformed_file_level(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"top.json.*JSON list"):
        load_rvs_annotations(write_json(tmp_path, {"videos": []}, "top.json"), tmp_path, 1.0)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match=r"bad.json.*not valid JSON"):
        load_rvs_annotations(tmp_path / "bad.json", tmp_path, 1.0)
    with pytest.raises(DataError, match=r"nope.json.*not found"):
        load_rvs_annotations(tmp_path / "nope.json", tmp_path, 1.0)


def test_record_errors_name_the_video(tmp_path: Path) -> None:
    data = good_records()
    data[1]["conversations"][0]["end_time"] = -3
    with pytest.raises(DataError, match=r"record v2, field 'conversations\[0\]\.end_time'"):
        load_rvs_annotations(write_json(tmp_path, data), tmp_path, 1.0)


def test_defaults_tolerance_and_resorting(tmp_path: Path) -> None:
    data = good_records()
    data[0]["conversations"].reverse()  # unsorted: re-sorted, ids keep the file's order
    data[0]["conversations"].append(
        {"question": "Last?", "answer": "Yes.", "start_time": 0, "end_time": 20.5}
    )
    data[0]["conversations"].append({"question": "Tie?", "answer": "No.", "start_time": 0, "end_time": 12})
    v1, v2 = load_rvs_annotations(write_json(tmp_path, data), tmp_path, 1.0)
    assert [q.qid for q in v1.questions] == ["v1_q1", "v1_q0", "v1_q3", "v1_q2"]  # stable for the 12 s tie
    assert [q.end_time for q in v1.questions] == [5.0, 12.0, 12.0, 20.5]  # 0.5 s past duration: tolerated
    assert v1.meta["resorted"] and not v2.meta["resorted"]
    assert v2.questions[0].start_time == 0.0  # start_time defaults to 0
    assert v2.meta["clip_start_time"] == 1.0 and v2.meta["video_path"] == str(tmp_path / "movie/v2.npy")
    assert (
        load_rvs_annotations(write_json(tmp_path, good_records()), tmp_path, 1.0)[0].meta["resorted"] is False
    )


def test_lazy_source_opens_on_first_use(tmp_path: Path) -> None:
    (v1,) = load_rvs_annotations(write_json(tmp_path, good_records()[:1]), tmp_path, 0.5)
    src = v1.source
    assert isinstance(src, LazySource) and not src.is_open
    with pytest.raises(VideoError, match=r"ego/videos/v1.npy.*not found"):
        len(src)
    frames = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    (tmp_path / "ego/videos").mkdir(parents=True)
    np.save(tmp_path / "ego/videos/v1.npy", frames)
    assert len(src) == 10 and src.is_open
    np.testing.assert_array_equal(src.frames(0, 2), frames[np.linspace(0, 19, 10, dtype=int)[:2]])
    assert frames_until(src, 12) == 6
    src.close()
    assert not src.is_open


# ------------------------------------------------------------------------------------------------ synthetic


SMALL = SyntheticSpec(
    num_videos=3, duration_s=40, sample_fps=1.0, frame_size=64, questions_per_video=12, seed=7
)


def classify_cell(frame: np.ndarray, cell: int) -> tuple[str, str] | None:
    """(colour, shape) read from pixels alone, or None for an empty cell: checks rendering independently."""
    c = cell_size(frame.shape[0])
    r, q = divmod(cell, GRID)
    patch = frame[r * c : (r + 1) * c, q * c : (q + 1) * c].astype(np.int32)
    bg = patch[0, 0]  # cell corners are outside every shape
    fg = np.abs(patch - bg).max(axis=-1) > 60
    if not fg.any():
        return None
    shapes = [s for s in SHAPES if np.array_equal(fg, shape_mask(s, c))]
    assert len(shapes) == 1, f"cell {cell}: foreground matches no single shape"
    mean = patch[fg].mean(axis=0)
    colour = min(COLOURS, key=lambda k: float(np.abs(mean - np.array(COLOURS[k])).sum()))
    assert np.abs(mean - np.array(COLOURS[colour])).max() < 4
    return colour, shapes[0]


def inside_pixel(shape: str, cell: int, frame_size: int) -> tuple[int, int]:
    """A pixel well inside a shape drawn in ``cell``: the centre, except for the ring (hollow), whose
    band is sampled half way between its radii."""
    cy, cx = cell_center(cell, frame_size)
    if shape == COUNT_SHAPE:
        cx += int(round(0.62 * cell_size(frame_size) / 2))
    return cy, cx


@pytest.fixture(scope="module")
def small_dataset() -> list[VideoSample]:
    return make_synthetic_dataset(SMALL)


@pytest.fixture(scope="module")
def small_pixels(small_dataset: list[VideoSample]) -> list[list[list[tuple[str, str] | None]]]:
    """Every cell of every frame of every video, classified from rendered pixels."""
    out = []
    for sample in small_dataset:
        frames = sample.source.frames(0, len(sample.source))
        out.append([[classify_cell(f, c) for c in range(GRID * GRID)] for f in frames])
    return out


def test_synthetic_is_deterministic(small_dataset: list[VideoSample]) -> None:
    again = make_synthetic_dataset(SMALL)
    for a, b in zip(small_dataset, again, strict=False):
        assert a.video_id == b.video_id and a.questions == b.questions
        assert a.source.frames(0, len(a.source)).tobytes() == b.source.frames(0, len(b.source)).tobytes()
    other = make_synthetic_dataset(SyntheticSpec(**{**SMALL.__dict__, "seed": 8}))
    assert [q.question for q in other[0].questions] != [q.question for q in small_dataset[0].questions]
    assert not np.array_equal(other[0].source.frames(0, 5), small_dataset[0].source.frames(0, 5))
    # a video does not depend on how many others the dataset has
    alone = make_video(SyntheticSpec(**{**SMALL.__dict__, "num_videos": 1}), 2)
    assert alone.questions == small_dataset[2].questions
    assert len({s.video_id for s in small_dataset}) == 3
    assert not np.array_equal(small_dataset[0].source.frames(0, 3), small_dataset[1].source.frames(0, 3))


def test_synthetic_questions_are_well_formed(small_dataset: list[VideoSample]) -> None:
    types = set()
    for s in small_dataset:
        assert len(s.questions) == SMALL.questions_per_video and s.duration == 40.0
        assert [q.qid for q in s.questions] == [f"{s.video_id}_q{i}" for i in range(len(s.questions))]
        assert [q.end_time for q in s.questions] == sorted(q.end_time for q in s.questions)
        for q in s.questions:
            types.add(q.qtype)
            assert 0 <= q.start_time <= q.end_time <= s.duration
            assert q.meta["age_s"] == pytest.approx(q.end_time - q.start_time)
            assert len(q.answer.split()) == 1
            assert q.meta["evidence_time"] == q.start_time
    assert types == set(QUESTION_TYPES)


def test_synthetic_answers_match_the_pixels(
    small_dataset: list[VideoSample], small_pixels: list[Any]
) -> None:
    for sample, pixels in zip(small_dataset, small_pixels, strict=False):
        scene: Scene = sample.source.scene
        for q in sample.questions:
            n = frames_until(sample.source, q.end_time)  # the frames the model has seen
            if q.qtype == "detail":
                f, cell, shape = q.meta["needle_frame"], q.meta["needle_cell"], q.meta["needle_shape"]
                assert f < n and q.start_time == f / SMALL.sample_fps and shape in NEEDLE_SHAPES
                assert pixels[f][cell] == (q.answer, shape)
                cy, cx = cell_center(
                    cell, SMALL.frame_size
                )  # the centre carries the needle colour, up to noise
                centre = render_frame(scene, f)[cy, cx].astype(int)
                assert np.abs(centre - COLOURS[q.answer]).max() <= SMALL.noise
                seen = [
                    (i, c) for i, row in enumerate(pixels) for c, v in enumerate(row) if v and v[1] == shape
                ]
                assert seen == [(f, cell)]  # exactly one frame in the whole stream
            elif q.qtype == "count":
                # recount rings from the pixels: every ring is a one-frame appearance
                rings = [i for i in range(n) for c in range(GRID * GRID) if pixels[i][c] and pixels[i][c][1] == COUNT_SHAPE]
                assert q.answer == str(len(rings)) and COUNT_SHAPE in q.question
                assert rings == q.meta["evidence_frames"] and 0 <= len(rings) <= 4
                assert q.start_time == (rings[0] / SMALL.sample_fps if rings else q.end_time)
            elif q.qtype == "current":
                assert q.meta["frame"] == n - 1
                cell = q.meta["cell"]
                assert f"row {cell // GRID + 1} column {cell % GRID + 1}" in q.question
                got = pixels[n - 1][cell]
                assert got is not None and got[1] == q.answer and q.answer in OBJECT_SHAPES
            elif q.qtype == "order":
                # both needles named in the question are on screen once, before the question; the answer is
                # the one whose frame comes first
                named = [w for w in q.question.rstrip("?").replace(",", "").split() if w in NEEDLE_SHAPES]
                assert len(named) == 2 and q.answer in named
                frames_of = {
                    s: [i for i in range(len(pixels)) for c in range(GRID * GRID) if pixels[i][c] and pixels[i][c][1] == s]
                    for s in named
                }
                assert all(len(f) == 1 and f[0] < n for f in frames_of.values())
                other = next(s for s in named if s != q.answer)
                assert frames_of[q.answer][0] < frames_of[other][0]
                assert q.start_time == frames_of[q.answer][0] / SMALL.sample_fps
            else:
                assert q.qtype == "motion" and q.answer in DIRECTIONS
                # the ball, read from the pixels: one cell per frame over 4 consecutive frames
                seen = [(i, c) for i in range(len(pixels)) for c in range(GRID * GRID)
                        if pixels[i][c] and pixels[i][c][1] == MOTION_SHAPE]
                assert len(seen) == 4 and [f for f, _ in seen] == list(range(seen[0][0], seen[0][0] + 4))
                assert seen[-1][0] < n and q.start_time == seen[0][0] / SMALL.sample_fps
                (r0, c0), (r1, c1) = divmod(seen[0][1], GRID), divmod(seen[-1][1], GRID)
                want = {(0, 3): "right", (0, -3): "left", (3, 0): "down", (-3, 0): "up"}[(r1 - r0, c1 - c0)]
                assert q.answer == want


def test_synthetic_source_renders_on_demand(small_dataset: list[VideoSample]) -> None:
    src = small_dataset[0].source
    assert isinstance(src, SyntheticVideoSource) and len(src) == 40
    np.testing.assert_array_equal(src.frames(5, 8), np.stack([render_frame(src.scene, i) for i in (5, 6, 7)]))
    assert src.frames(39, 50).shape == (1, 64, 64, 3) and src.frames(40, 40).shape == (0, 64, 64, 3)
    with pytest.raises(IndexError):
        render_frame(src.scene, 40)


def test_synthetic_rendering_is_fast() -> None:
    (sample,) = make_synthetic_dataset(SyntheticSpec(num_videos=1, duration_s=60, sample_fps=2, seed=0))
    t = time.perf_counter()
    frames = sample.source.frames(0, 120)
    assert frames.shape == (120, 112, 112, 3) and frames.dtype == np.uint8
    assert time.perf_counter() - t < 1.0


def test_synthetic_detail_falls_back_when_needles_run_out() -> None:
    (sample,) = make_synthetic_dataset(
        SyntheticSpec(
            num_videos=1, duration_s=30, frame_size=64, questions_per_video=5, question_types=("detail",)
        )
    )
    # three needle shapes: three detail questions, then the fallback ("count")
    assert sorted(q.qtype for q in sample.questions) == ["count", "count", "detail", "detail", "detail"]
    assert len({q.meta.get("needle_shape") for q in sample.questions if q.qtype == "detail"}) == 3


def test_synthetic_needle_depth_is_controlled_and_recorded() -> None:
    for depth in (0.0, 0.5, 1.0):
        videos = make_synthetic_dataset(SyntheticSpec(num_videos=3, duration_s=200, sample_fps=0.5,
                                                      questions_per_video=3, question_types=("detail",),
                                                      needle_depth=depth, seed=4))
        for v in videos:
            for q in v.questions:
                n = frames_until(v.source, q.end_time)
                assert abs(q.meta["needle_frame"] - depth * (n - 1)) <= 3  # nearest frame with a free cell
                assert q.meta["needle_depth"] == pytest.approx(q.meta["needle_frame"] / (n - 1))
                assert q.meta["age_s"] == pytest.approx(q.end_time - q.meta["needle_frame"] / 0.5)


def test_synthetic_types_are_balanced_and_chance_is_stated() -> None:
    videos = make_synthetic_dataset(SyntheticSpec(num_videos=30, duration_s=60, sample_fps=0.5,
                                                  questions_per_video=4, seed=11))
    counts = {t: 0 for t in QUESTION_TYPES}
    for v in videos:
        for q in v.questions:
            counts[q.qtype] += 1
    assert min(counts.values()) >= 12, counts  # 120 questions over 5 types; fallbacks are rare
    assert set(CHANCE) == set(QUESTION_TYPES) and all(0 < c < 1 for c in CHANCE.values())


def test_synthetic_train_and_eval_seeds_are_disjoint() -> None:
    with pytest.raises(ConfigError, match="evaluation seeds"):
        SyntheticSpec(seed=TRAIN_SEED_BASE)
    with pytest.raises(ConfigError, match="training seeds"):
        SyntheticSpec(seed=3, split="train")
    train = make_video(SyntheticSpec(num_videos=1, seed=TRAIN_SEED_BASE, split="train"), 0)
    assert train.meta["split"] == "train"


def test_synthetic_two_hour_stream_renders_on_demand_fast() -> None:
    t = time.perf_counter()
    (sample,) = make_synthetic_dataset(SyntheticSpec(num_videos=1, duration_s=7200, sample_fps=0.5,
                                                     questions_per_video=10, seed=5))
    assert len(sample.source) == 3600 and time.perf_counter() - t < 2.0
    t = time.perf_counter()
    frames = sample.source.frames(3500, 3564)  # any chunk, without rendering what came before
    assert frames.shape == (64, 112, 112, 3) and time.perf_counter() - t < 1.0
    assert max(q.meta["age_s"] for q in sample.questions) > 600  # evidence far in the past exists


def test_synthetic_spec_validation() -> None:
    with pytest.raises(ConfigError, match="question_types"):
        SyntheticSpec(question_types=("detail", "colour"))
    with pytest.raises(ConfigError, match="at least 2 frames"):
        SyntheticSpec(duration_s=1, sample_fps=1)


@pytest.mark.parametrize("video_format, fps", [("npy", 0.5), ("mp4", 0.5), ("mp4", 2.0)])
def test_synthetic_export_round_trip(tmp_path: Path, video_format: str, fps: float) -> None:
    spec = SyntheticSpec(
        num_videos=2, duration_s=12, sample_fps=fps, frame_size=64, questions_per_video=4, seed=3
    )
    ann = export_synthetic(spec, tmp_path, video_format=video_format)
    loaded = load_rvs_annotations(ann, data_root=tmp_path, sample_fps=fps, check_videos=True)
    for orig, back in zip(make_synthetic_dataset(spec), loaded, strict=False):
        assert back.video_id == orig.video_id and back.duration == orig.duration
        assert [(q.qid, q.question, q.answer, q.start_time, q.end_time) for q in back.questions] == [
            (q.qid, q.question, q.answer, q.start_time, q.end_time) for q in orig.questions
        ]
        assert len(back.source) == len(orig.source)
        want, got = orig.source.frames(0, len(orig.source)), back.source.frames(0, len(back.source))
        if video_format == "npy":
            np.testing.assert_array_equal(got, want)  # lossless, sampled back exactly
        else:
            err = np.abs(got.astype(int) - want.astype(int)).mean(axis=(1, 2, 3))
            assert err.max() < 12, err  # lossy (noise, chroma subsampling) but close
            for i in range(len(want)):
                for c in range(GRID * GRID):
                    inst = orig.source.scene.at(i, c)
                    if inst is not None:
                        cy, cx = inside_pixel(inst.shape, c, spec.frame_size)
                        # every sampled frame is the right one: each object sits where the scene says
                        assert np.abs(got[i, cy, cx].astype(int) - COLOURS[inst.colour]).max() < 40


def test_npy_export_rejects_rates_it_cannot_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mp4"):
        export_synthetic(
            SyntheticSpec(num_videos=1, duration_s=4, sample_fps=2.0, frame_size=64), tmp_path, "npy"
        )
