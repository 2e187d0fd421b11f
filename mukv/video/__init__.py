"""Frame sources: mp4 (decord), 1-fps ``.npy`` arrays and in-memory frames, all sampled at ``sample_fps``."""

from mukv.video.sources import (
    DECORD_SUFFIXES,
    NPY_SUFFIXES,
    SUPPORTED_SUFFIXES,
    ArraySource,
    Mp4Source,
    NpySource,
    open_video,
    write_mp4,
)

__all__ = [
    "DECORD_SUFFIXES",
    "NPY_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "ArraySource",
    "Mp4Source",
    "NpySource",
    "open_video",
    "write_mp4",
]
