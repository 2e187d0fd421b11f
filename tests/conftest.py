"""Shared fixtures: the tiny model (built once per session), the shared/ folder beside the project, and the
compose-API helper of the config tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"
RVS_DIR = SHARED / "data" / "rvs"


def compose_cfg(*overrides: str, hydra_cfg: bool = False):
    """The run config ``conf/eval.yaml`` with ``overrides``, through Hydra's compose API. ``${hydra:...}`` resolves
    only inside a running app, so the paths get concrete values (unless ``hydra_cfg``: the Hydra config too)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides), return_hydra_config=hydra_cfg)
    if not hydra_cfg:
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = "/tmp/mukv-test-out"
    return cfg


@pytest.fixture(scope="session")
def tiny_llm():
    from mukv.models.loading import load_video_llm

    return load_video_llm("tiny", None, device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def rvs_dir() -> Path:
    assert RVS_DIR.is_dir(), f"the RVS annotation files are expected in {RVS_DIR} (../shared beside the repo)"
    return RVS_DIR


class ArrayFrames:
    """Frames in memory at a given fps (a FrameSource for tests)."""

    def __init__(self, frames: np.ndarray, sample_fps: float = 1.0) -> None:
        self.array, self.sample_fps = frames, sample_fps

    def __len__(self) -> int:
        return len(self.array)

    def frames(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


def random_frames(n: int, size: int = 112, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
