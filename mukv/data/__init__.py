"""Datasets: RVS and OVO-Bench annotations and the synthetic stream, all as lists of :class:`VideoSample`."""

from mukv.data.ovo_bench import load_ovo_bench
from mukv.data.rvs import (
    RVS_PATH_PREFIX,
    LazySource,
    load_rvs_annotations,
    resolve_video_path,
)
from mukv.data.synthetic import (
    SyntheticSpec,
    SyntheticVideoSource,
    export_synthetic,
    make_synthetic_dataset,
    render_frame,
)
from mukv.data.types import (
    FrameSource,
    Question,
    VideoSample,
    frames_until,
    iter_chunks,
)

__all__ = [
    "RVS_PATH_PREFIX",
    "FrameSource",
    "LazySource",
    "Question",
    "SyntheticSpec",
    "SyntheticVideoSource",
    "VideoSample",
    "export_synthetic",
    "frames_until",
    "iter_chunks",
    "load_ovo_bench",
    "load_rvs_annotations",
    "make_synthetic_dataset",
    "render_frame",
    "resolve_video_path",
]
