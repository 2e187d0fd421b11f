"""Frame sources: real mp4 round trips, published sampling formulas, and errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mukv.data.types import frames_until, iter_chunks
from mukv.errors import VideoError
from mukv.video import ArraySource, Mp4Source, NpySource, open_video, write_mp4

N_FRAMES, SIZE, FILE_FPS = 20, 64, 4


def counter_colour(k: int) -> np.ndarray:
    """Colour of the big block that encodes frame number ``k`` (distinct, far apart, survives yuv420p)."""
    return np.array([12 * k, 240 - 10 * k, 128], dtype=np.float64)


def counter_frames(n: int = N_FRAMES, size: int = SIZE) -> np.ndarray:
    frames = np.zeros((n, size, size, 3), dtype=np.uint8)
    for k in range(n):
        frames[k, : size // 2] = counter_colour(k).astype(np.uint8)  # top half: the counter block
    return frames


def block_colour(frames: np.ndarray) -> np.ndarray:
    """Mean colour of each frame's counter block, away from its edges (chroma bleeds across them)."""
    return frames[:, 4 : SIZE // 2 - 4, 4:-4].reshape(len(frames), -1, 3).mean(axis=1)


@pytest.fixture(scope="module")
def counter_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mp4") / "counter.mp4"
    write_mp4(path, counter_frames(), FILE_FPS)
    return path


def test_mp4_round_trip_samples_the_published_frames(counter_mp4: Path) -> None:
    src = Mp4Source(counter_mp4, sample_fps=2)
    # fps = round(4.0) = 4, step = int(4 / 2) = 2 -> source frames 0, 2, ..., 18
    assert (src.native_fps, src.step, len(src)) == (4, 2, 10)
    frames = src.frames(0, len(src))
    assert frames.shape == (10, SIZE, SIZE, 3) and frames.dtype == np.uint8
    expected = np.stack([counter_colour(k) for k in range(0, N_FRAMES, 2)])
    np.testing.assert_allclose(block_colour(frames), expected, atol=6)
    # the bottom half stays black
    assert frames[:, SIZE // 2 + 4 :].mean() < 6


def test_mp4_low_sample_rate_and_slices(counter_mp4: Path) -> None:
    src = Mp4Source(counter_mp4, sample_fps=0.5)  # step = int(4 / 0.5) = 8 -> frames 0, 8, 16
    assert len(src) == 3
    np.testing.assert_allclose(
        block_colour(src.frames(1, 3)), [counter_colour(8), counter_colour(16)], atol=6
    )
    assert src.frames(2, 100).shape[0] == 1  # clamped like a slice
    assert src.frames(3, 3).shape == (0, SIZE, SIZE, 3)
    assert frames_until(src, 4.0) == 2


def test_mp4_sample_rate_above_file_rate_keeps_every_frame(counter_mp4: Path) -> None:
    assert len(Mp4Source(counter_mp4, sample_fps=10)) == N_FRAMES  # step = max(1, int(0.4)) = 1


def test_chunked_reading_equals_one_read(counter_mp4: Path, tmp_path: Path) -> None:
    arr = counter_frames(13)
    np.save(tmp_path / "v.npy", arr)
    sources = [
        Mp4Source(counter_mp4, sample_fps=4),
        NpySource(tmp_path / "v.npy", sample_fps=1),
        ArraySource(arr, sample_fps=1),
    ]
    for src in sources:
        whole = src.frames(0, len(src))
        chunks = list(iter_chunks(src, 0, len(src), 3))
        assert [lo for lo, _ in chunks] == list(range(0, len(src), 3))
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), whole)
        # a partial window, chunked, matches the same slice
        part = np.concatenate([c for _, c in iter_chunks(src, 2, 9, 4)])
        np.testing.assert_array_equal(part, whole[2:9])


def test_npy_published_sampling(tmp_path: Path) -> None:
    arr = counter_frames(10, 16)
    np.save(tmp_path / "m.npy", arr)
    src = open_video(tmp_path / "m.npy", 0.5)
    assert isinstance(src, NpySource)
    idx = np.linspace(0, 9, int(10 * 0.5), dtype=int)  # [0, 2, 4, 6, 9]
    np.testing.assert_array_equal(src.indices, idx)
    np.testing.assert_array_equal(src.frames(0, len(src)), arr[idx])
    assert len(NpySource(tmp_path / "m.npy", 1.0)) == 10
    assert len(NpySource(tmp_path / "m.npy", 1.0, stored_fps=2.0)) == 5


@pytest.mark.parametrize(
    "arr, needle",
    [
        (np.zeros((4, 8, 8), np.uint8), "(N, H, W, 3)"),
        (np.zeros((4, 8, 8, 4), np.uint8), "(4, 8, 8, 4)"),
        (np.zeros((4, 8, 8, 3), np.float32), "float32"),
        (np.zeros((4, 8, 8, 3), np.float64) + 255, "float64"),
        (np.zeros((0, 8, 8, 3), np.uint8), "no frames"),
    ],
    ids=["ndim3", "4channels", "float32", "float255", "empty"],
)
def test_npy_rejects_bad_arrays(tmp_path: Path, arr: np.ndarray, needle: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, arr)
    with pytest.raises(VideoError, match="bad.npy") as err:
        open_video(path, 1.0)
    assert needle in str(err.value)


def test_truncated_npy_is_a_video_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.npy"
    np.save(path, counter_frames(10, 16))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(VideoError, match="cut.npy"):
        NpySource(path, 1.0)


@pytest.mark.parametrize("name", ["missing.mp4", "missing.npy", "missing.mkv"])
def test_missing_video_names_the_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(VideoError, match="not found") as err:
        open_video(tmp_path / name, 1.0)
    assert str(tmp_path / name) in str(err.value)


def test_unsupported_suffix_lists_supported(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match=r"\.gif.*\.mp4.*\.npy"):
        open_video(tmp_path / "x.gif", 1.0)


def test_corrupt_mp4_is_a_video_error(tmp_path: Path) -> None:
    path = tmp_path / "x.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(VideoError, match="x.mp4") as err:
        Mp4Source(path, 1.0)
    assert "corrupt" in str(err.value)


def test_truncated_mp4_is_a_video_error(counter_mp4: Path, tmp_path: Path) -> None:
    data = counter_mp4.read_bytes()
    path = tmp_path / "half.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="half.mp4"):
        src = Mp4Source(path, 2.0)  # fails here when the index (moov) was cut off ...
        src.frames(0, len(src))  # ... or here when the frame data was


def test_write_mp4_validates_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8), 1)
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "f.mp4", np.zeros((2, 16, 16, 3), np.float32), 1)
    with pytest.raises(ValueError, match="at least one frame"):
        write_mp4(tmp_path / "e.mp4", np.zeros((0, 16, 16, 3), np.uint8), 1)
    assert not any(tmp_path.iterdir())  # no half-written files left behind


def test_write_mp4_accepts_chunks(tmp_path: Path) -> None:
    frames = counter_frames(8)
    write_mp4(tmp_path / "c.mp4", (frames[i : i + 3] for i in range(0, 8, 3)), 2)
    src = Mp4Source(tmp_path / "c.mp4", 2)
    assert len(src) == 8
    np.testing.assert_allclose(block_colour(src.frames(0, 8)), [counter_colour(k) for k in range(8)], atol=6)


def test_array_source() -> None:
    arr = counter_frames(5, 8)
    src = ArraySource(arr, sample_fps=0.5)
    assert len(src) == 5 and frames_until(src, 4.0) == 2
    np.testing.assert_array_equal(src.frames(1, 3), arr[1:3])
    with pytest.raises(VideoError, match="uint8"):
        ArraySource(arr.astype(np.float32), 1.0)
    with pytest.raises(IndexError):
        src.frames(-1, 2)


def test_decode_failure_at_read_time_is_a_video_error(counter_mp4: Path) -> None:
    src = Mp4Source(counter_mp4, 2.0)

    class Broken:
        def get_batch(self, idx: list[int]) -> None:
            raise RuntimeError("Error reading frame 12")

    src._vr = Broken()  # what decord does when packets past the index are missing
    with pytest.raises(VideoError, match=r"counter.mp4.*Error reading frame 12"):
        src.frames(0, 4)
