"""Frame sources: videos on disk (mp4 via decord, 1-fps ``.npy`` arrays) or in memory, at ``sample_fps``.

Every source follows :class:`mukv.data.types.FrameSource`: ``len()`` is the number of *sampled* frames and
``frames(start, stop)`` decodes only those, so an hour of video is never held in memory at once. Sampling
reproduces the published ReKV/MuKV code exactly (see each class), because the frame a question sees decides
its answer. ``duration_s`` is the file's real length in seconds, read when it opens (an mp4's frame count over
its average frame rate, a ``.npy``'s frames over ``stored_fps``): a question asked past it would otherwise be
answered from the frames that exist, with no word (see ``mukv.inputs.screen_past_end``).
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mukv.errors import VideoError

if TYPE_CHECKING:  # runtime import would cycle: mukv.data imports this module
    from mukv.data.types import FrameSource

DECORD_SUFFIXES: tuple[str, ...] = (".mp4", ".mkv", ".avi", ".webm", ".mov")
NPY_SUFFIXES: tuple[str, ...] = (".npy",)
SUPPORTED_SUFFIXES: tuple[str, ...] = DECORD_SUFFIXES + NPY_SUFFIXES


def _slice_indices(indices: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Sampled positions ``start:stop``, clamped like a slice (a negative bound is a bug, not a wrap)."""
    if start < 0 or stop < 0:
        raise IndexError(f"frame range {start}:{stop} has a negative bound")
    return indices[start:stop]


def _check_fps(path: str | Path, sample_fps: float) -> float:
    fps = float(sample_fps)
    if not np.isfinite(fps) or fps <= 0:
        raise VideoError(path, f"sample_fps must be a positive number, got {sample_fps!r}")
    return fps


def _check_frames_array(path: str | Path, arr: np.ndarray) -> None:
    """Strict (N, H, W, 3) uint8, N > 0: a float or 4-channel array would silently feed the model garbage."""
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise VideoError(path, f"expected frames of shape (N, H, W, 3), got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        raise VideoError(path, f"expected frames of dtype uint8 (RGB 0-255), got dtype {arr.dtype}")
    if arr.shape[0] == 0:
        raise VideoError(path, "contains no frames (N = 0)")


class Mp4Source:
    """A decord-readable video (mp4, mkv, ...), sampled as the published code does.

    ``fps = round(avg_fps)``, ``step = int(fps / sample_fps)`` (at least 1) and the sampled source frames
    are ``range(0, len(video), step)``. Opening reads only the container metadata; frames are decoded by
    ``frames()``. Decoding errors (a file truncated after its index, say) are raised as :class:`VideoError`.
    """

    def __init__(self, path: str | Path, sample_fps: float, num_threads: int = 1) -> None:
        self.path = Path(path)
        self.sample_fps = _check_fps(self.path, sample_fps)
        if not self.path.is_file():
            raise VideoError(self.path, "not found")
        try:
            import decord  # lazy: only mp4 users need it, and it is heavy to import
        except ImportError as e:  # pragma: no cover - decord is a dependency
            raise VideoError(
                self.path, f"reading this video needs decord, which failed to import ({e})"
            ) from e
        try:
            self._vr: Any = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=num_threads)
            n_source = len(self._vr)
            avg_fps = float(self._vr.get_avg_fps())
        except Exception as e:  # decord raises RuntimeError/DECORDError with the ffmpeg reason
            raise VideoError(self.path, f"cannot be opened (corrupt or unsupported): {_reason(e)}") from e
        if n_source <= 0:
            raise VideoError(self.path, "contains no frames")
        self.native_fps = round(avg_fps)
        if self.native_fps <= 0:
            raise VideoError(self.path, f"average frame rate {avg_fps!r} fps rounds to 0; cannot sample it")
        self.duration_s = n_source / avg_fps  # the real length, whatever an annotation claims
        self.step = max(1, int(self.native_fps / self.sample_fps))
        self.indices = np.arange(0, n_source, self.step, dtype=np.int64)
        self._frame_shape: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def frames(self, start: int, stop: int) -> np.ndarray:
        idx = _slice_indices(self.indices, start, stop)
        if len(idx) == 0:
            return np.empty((0, *self._shape()), dtype=np.uint8)
        try:
            out = self._vr.get_batch(idx.tolist()).asnumpy()
        except Exception as e:
            raise VideoError(
                self.path, f"frames {start}:{stop} failed to decode (truncated or corrupt?): {_reason(e)}"
            ) from e
        self._frame_shape = tuple(out.shape[1:])  # type: ignore[assignment]
        return out

    def _shape(self) -> tuple[int, int, int]:
        if self._frame_shape is None:
            self.frames(0, 1)
        assert self._frame_shape is not None
        return self._frame_shape

    def __repr__(self) -> str:
        return f"Mp4Source({str(self.path)!r}, sample_fps={self.sample_fps}, frames={len(self)})"


class NpySource:
    """A ``.npy`` array of frames stored at ``stored_fps`` (RVS-Movie: 1 fps), memory-mapped.

    Published sampling: with ``n`` stored frames the sampled ones are
    ``np.linspace(0, n - 1, int(n * sample_fps / stored_fps), dtype=int)`` (the published code has
    ``stored_fps = 1`` built in). Nothing but the header is read on open.
    """

    def __init__(self, path: str | Path, sample_fps: float, stored_fps: float = 1.0) -> None:
        self.path = Path(path)
        self.sample_fps = _check_fps(self.path, sample_fps)
        self.stored_fps = float(stored_fps)
        if not self.path.is_file():
            raise VideoError(self.path, "not found")
        try:
            self._arr: np.ndarray = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # bad header, truncated data, pickled object array, ...
            raise VideoError(self.path, f"cannot be read as a .npy frame array: {_reason(e)}") from e
        _check_frames_array(self.path, self._arr)
        n = self._arr.shape[0]
        self.duration_s = n / self.stored_fps  # the real length, whatever an annotation claims
        self.indices = np.linspace(0, n - 1, int(n * self.sample_fps / self.stored_fps), dtype=int)

    def __len__(self) -> int:
        return len(self.indices)

    def frames(self, start: int, stop: int) -> np.ndarray:
        idx = _slice_indices(self.indices, start, stop)
        try:
            return np.ascontiguousarray(self._arr[idx])
        except Exception as e:  # pragma: no cover - I/O error under the memory map
            raise VideoError(self.path, f"frames {start}:{stop} could not be read: {_reason(e)}") from e

    def __repr__(self) -> str:
        return f"NpySource({str(self.path)!r}, sample_fps={self.sample_fps}, frames={len(self)})"


class ArraySource:
    """Frames already in memory and already at ``sample_fps`` (synthetic data, tests)."""

    def __init__(self, frames: np.ndarray, sample_fps: float) -> None:
        self.sample_fps = _check_fps("<array>", sample_fps)
        _check_frames_array("<array>", frames)
        self._frames = frames
        self.duration_s = len(frames) / self.sample_fps

    def __len__(self) -> int:
        return int(self._frames.shape[0])

    def frames(self, start: int, stop: int) -> np.ndarray:
        if start < 0 or stop < 0:
            raise IndexError(f"frame range {start}:{stop} has a negative bound")
        return self._frames[start:stop]

    def __repr__(self) -> str:
        return f"ArraySource(frames={len(self)}, sample_fps={self.sample_fps})"


def open_video(path: str | Path, sample_fps: float) -> FrameSource:
    """Open a video by its suffix: decord formats -> :class:`Mp4Source`, ``.npy`` -> :class:`NpySource`."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in DECORD_SUFFIXES:
        return Mp4Source(p, sample_fps)
    if suffix in NPY_SUFFIXES:
        return NpySource(p, sample_fps)
    raise VideoError(
        p, f"unsupported suffix {suffix or '(none)'!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
    )


def write_mp4(path: str | Path, frames: np.ndarray | Iterable[np.ndarray], fps: float) -> None:
    """Encode uint8 RGB frames to an H.264 (else MPEG-4 part 2) yuv420p file with PyAV.

    ``frames`` is one (n, H, W, 3) array or an iterable of such chunks (so a long stream is never held
    whole). yuv420p halves the chroma resolution, so H and W must be even: anything else is a ValueError.
    Used by tests and by the synthetic dataset's export.
    """
    import av  # lazy: only writers need it

    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"write_mp4 needs a positive fps, got {fps!r}")
    chunks = [frames] if isinstance(frames, np.ndarray) else frames
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    written, shape = 0, None
    try:
        with av.open(str(path), "w") as container:
            stream = None
            for chunk in chunks:
                chunk = np.asarray(chunk)
                if chunk.ndim != 4 or chunk.shape[-1] != 3 or chunk.dtype != np.uint8:
                    raise ValueError(
                        f"write_mp4 needs uint8 frames of shape (n, H, W, 3), got {chunk.dtype} {chunk.shape}"
                    )
                if shape is None:
                    shape = chunk.shape[1:3]
                    h, w = shape
                    if h % 2 or w % 2:
                        raise ValueError(
                            f"write_mp4 needs even frame height and width (yuv420p), got {h}x{w}"
                        )
                    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
                    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                    stream.options = {"crf": "18"} if codec == "libx264" else {"qscale": "2"}
                elif chunk.shape[1:3] != shape:
                    raise ValueError(f"write_mp4: frame size changed from {shape} to {chunk.shape[1:3]}")
                assert stream is not None
                for frame in chunk:
                    video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                    for packet in stream.encode(video_frame):
                        container.mux(packet)
                    written += 1
            if stream is not None:
                for packet in stream.encode():
                    container.mux(packet)
        if written == 0:
            raise ValueError("write_mp4 needs at least one frame")
    except BaseException:
        Path(path).unlink(missing_ok=True)  # never leave a half-written file that looks like a video
        raise


def _reason(e: BaseException) -> str:
    """First line of a decoder error, without decord's long C++ backtrace."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
