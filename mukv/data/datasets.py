"""The datasets a config can name (``dataset._target_``): each checks its own options before anything loads
and turns the config into the list of videos with their questions.

Selection that applies to every dataset (``limit_questions``, ``max_minutes``, sharding) is the pipeline's
(mukv/train_eval.py ``build_dataset``); what is specific to a source lives here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from mukv.data.ovo_bench import TASK_CATEGORIES
from mukv.data.synthetic import QUESTION_CATEGORIES
from mukv.data.types import VideoSample
from mukv.errors import ConfigError, DataError


def _positive(value: Any, name: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ConfigError(name, f"must be a positive number, got {value!r}")


class Dataset:
    """A source of videos; subclasses are named by ``dataset._target_``."""

    kind: ClassVar[str] = "dataset"  # a label for messages and outputs
    has_files: ClassVar[bool] = False  # reads annotation and video files (hashed in the fingerprint)
    # What the question types measure, reported apart in metrics.json (``by_category``): category -> types
    categories: ClassVar[dict[str, tuple[str, ...]]] = {}
    # The dataset's leaderboard averages per type, then per category (OVO-Bench): metrics.json adds each
    # category's mean of its types' accuracies and the mean of those (``macro_accuracy``, beside the pooled
    # ``accuracy``; mukv.report.metrics.macro_scores)
    macro_average: ClassVar[bool] = False
    # The judge the dataset's scoring is defined with (a run under another one says so in one warning line)
    judge: ClassVar[str | None] = None

    @classmethod
    def check_config(cls, ds: DictConfig) -> None:
        """Raise ``ConfigError`` naming ``dataset.<field>``; no video is opened."""

    @classmethod
    def load(cls, ds: DictConfig) -> list[VideoSample]:
        """Every video of the dataset (``video_ids`` and ``limit_videos`` applied), with its questions."""
        raise NotImplementedError


class RVSDataset(Dataset):
    """RVS-Ego / RVS-Movie: an annotation JSON and its video files (mukv/data/rvs.py)."""

    kind = "rvs"
    has_files = True

    @classmethod
    def check_config(cls, ds: DictConfig) -> None:
        if not ds.annotation:
            raise ConfigError("dataset.annotation", "an RVS annotation JSON file is required")
        if not Path(ds.annotation).is_file():
            raise ConfigError("dataset.annotation", f"file not found: {ds.annotation} (see data/README.md)")
        if not ds.data_root:
            raise ConfigError("dataset.data_root", "the folder that holds the videos is required for an RVS dataset")

    @classmethod
    def load(cls, ds: DictConfig) -> list[VideoSample]:
        from mukv.data.rvs import load_rvs_annotations

        videos = load_rvs_annotations(
            ds.annotation, data_root=ds.data_root, sample_fps=ds.sample_fps,
            video_path_prefix=ds.video_path_prefix, limit_videos=ds.limit_videos,
            video_ids=list(ds.video_ids) or None, check_videos=ds.check_videos,
            allow_outside_root=ds.allow_outside_root,
        )
        if not videos:  # an empty list: exit 2 rather than a run that did nothing
            raise DataError(ds.annotation, "holds no video records: nothing to run")
        return videos


class OVOBenchDataset(Dataset):
    """OVO-Bench: one annotation JSON, its videos under ``data_root``, the tasks of ``dataset.tasks``
    (mukv/data/ovo_bench.py); scored by ``judge=choice``, per task, category and overall."""

    kind = "ovo_bench"
    has_files = True
    categories = TASK_CATEGORIES  # backward / realtime / forward: the leaderboard's categories of the tasks
    macro_average = True
    judge = "choice"

    @classmethod
    def check_config(cls, ds: DictConfig) -> None:
        if not ds.annotation:
            raise ConfigError("dataset.annotation", "the OVO-Bench annotation JSON (ovo_bench_new.json) is required")
        if not Path(ds.annotation).is_file():
            raise ConfigError("dataset.annotation", f"file not found: {ds.annotation} (see data/README.md)")
        if not ds.data_root:
            raise ConfigError("dataset.data_root", "the folder that holds OVO-Bench's source videos is required")
        if not len(ds.tasks):
            raise ConfigError("dataset.tasks", "selects no task: give at least one of OVO-Bench's twelve")

    @classmethod
    def load(cls, ds: DictConfig) -> list[VideoSample]:
        from mukv.data.ovo_bench import load_ovo_bench

        tasks = [str(getattr(t, "value", t)) for t in ds.tasks]
        videos = load_ovo_bench(
            ds.annotation, data_root=ds.data_root, sample_fps=ds.sample_fps, tasks=tasks,
            limit_videos=ds.limit_videos, video_ids=list(ds.video_ids) or None, check_videos=ds.check_videos,
            allow_outside_root=ds.allow_outside_root,
        )
        if not videos:
            raise DataError(ds.annotation, f"holds no question of the tasks {tasks}: nothing to run")
        return videos


class SyntheticDataset(Dataset):
    """Procedural streams with exact answers, made on the fly from ``dataset.synthetic`` (deterministic)."""

    kind = "synthetic"
    categories = QUESTION_CATEGORIES

    @staticmethod
    def spec(ds: DictConfig):
        """The ``SyntheticSpec`` of the config; errors name ``dataset.synthetic.<field>``."""
        from mukv.data.synthetic import SyntheticSpec

        syn = OmegaConf.to_container(ds.synthetic, resolve=True, enum_to_str=True)
        try:
            return SyntheticSpec(sample_fps=ds.sample_fps, **{**syn, "duration_s": float(syn["duration_s"])})
        except ConfigError as err:
            raise ConfigError(f"dataset.synthetic.{err.field}", str(err).split(": ", 1)[-1]) from err

    @classmethod
    def check_config(cls, ds: DictConfig) -> None:
        for key in ("num_videos", "duration_s", "questions_per_video", "frame_size"):
            _positive(ds.synthetic[key], f"dataset.synthetic.{key}")
        cls.spec(ds)  # every other field, named as dataset.synthetic.<field>

    @classmethod
    def load(cls, ds: DictConfig) -> list[VideoSample]:
        from mukv.data.synthetic import make_synthetic_dataset

        videos = make_synthetic_dataset(cls.spec(ds))
        if ds.video_ids:  # as the RVS loader: every id must name a video
            known = {s.video_id for s in videos}
            unknown = [v for v in ds.video_ids if v not in known]
            if unknown:
                raise ConfigError("dataset.video_ids", f"no synthetic video is called {', '.join(map(repr, unknown[:3]))}"
                                  f"{' ...' if len(unknown) > 3 else ''}; this config makes {videos[0].video_id} .. "
                                  f"{videos[-1].video_id} (dataset.synthetic.num_videos={len(videos)})")
            videos = [v for v in videos if v.video_id in set(ds.video_ids)]
        return videos[: ds.limit_videos] if ds.limit_videos else videos


def dataset_class(ds: DictConfig) -> type[Dataset]:
    """The dataset class ``dataset._target_`` names."""
    from mukv.components import component_class

    cls = component_class(ds, "dataset")
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise ConfigError("dataset._target_", f"must name a mukv.data.datasets.Dataset class, got {ds.get('_target_')!r}")
    return cls


def scoring_options(ds: Any) -> dict[str, Any]:
    """The ``summarize`` options of the dataset a config (or a run's resolved config mapping) names:
    ``categories`` and ``macro_average`` of its class ({} where ``_target_`` names no dataset class)."""
    try:
        cls = dataset_class(ds if isinstance(ds, DictConfig) else OmegaConf.create(dict(ds or {})))
    except ConfigError:
        return {}
    return {"categories": cls.categories, "macro_average": cls.macro_average}
