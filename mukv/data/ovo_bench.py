"""OVO-Bench (CVPR'25, ``JoeLeelyf/OVO-Bench``): its annotation file -> :class:`VideoSample` list, validated
record by record, and its scoring.

File schema (``ovo_bench_new.json``): a JSON list of records, each with an integer ``id`` (unique), a ``task``
and a ``video`` path relative to the video root (``Ego4D/clips/<uid>.mp4``, ...). Three shapes:

- multiple choice (backward tracing EPM, ASI, HLD; real-time perception STU, OJR, ATR, ACR, OCR, FPD):
  ``question``, ``options`` (2-8 strings), ``gt`` (the index of the right option), ``realtime`` (seconds: when
  the question is asked). One question; the reference is the option's letter (``chr(65 + gt)``);
- forward active responding, each with ``test_info``, a non-empty list of probes ``{realtime, ...}``, every
  probe one question asked at its time: REC (``activity``; a probe's ``count`` is the reference: how many
  times the action was done by then), SSR (a probe's ``step`` and ``type``: 1 = that step is being done then,
  reference ``Yes``; 0: ``No``), CRR (``question``; a probe's ``type``: 1 = the clue has been shown by then,
  ``Yes``; 0: ``No``).

Other fields (``answer``, ``ask_time``, ``all_steps``, ...) are kept in the question's meta or ignored. Each
failure is one :class:`DataError` naming the file, the record (``#<index> (id <id>)``) and the field
(``gt``, ``test_info[3].type``, ...): a record that is not an object, a missing field, a ``task`` that is not
one of the twelve, an ``id`` that is not an integer or repeats, an empty ``video``, an empty question, step or
activity, options that are not 2-8 strings, ``gt`` outside the options, a time or count that is not a finite
non-negative number (integer for counts), a ``type`` other than 0 or 1, an empty ``test_info``.

Streaming: the records of one source video become ONE :class:`VideoSample` (the video is streamed once) whose
questions (its items and probes, ``dataset.tasks`` selected) are answered in time order. The official
evaluation cuts the video at ``ceil(realtime)`` seconds for each question (``utils/chunk_videos.py``); a
question is asked here at that time, so the stream has shown what the official clip holds (at
``dataset.sample_fps``; the official LLaVA-OneVision evaluation instead samples 64 frames uniformly from the
clip). A question asked before the first sampled frame (one: id 1117 at 0.03 s) is asked at that frame, as
the official clip of it holds the video's first second. Question ids: ``ovo<id>`` for an item,
``ovo<id>_p<j>`` for probe ``j`` of a forward record (``j``: its index in ``test_info``).

Scoring (``utils/OVOBenchScore.py``): a task's accuracy is over its items, or for a forward task over all its
probes; a category's score is the mean of its tasks' accuracies; the overall score is the mean of the three
categories'. In a run, the task is the question type and the category is the dataset's
(``OVOBenchDataset.categories``), so ``metrics.json`` carries them (``by_type``; ``by_category`` with
``macro_accuracy``; ``macro_accuracy`` overall: ``mukv.report.metrics.macro_scores``). Answers are scored by
``judge=choice`` (:mod:`mukv.judge.choice`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mukv.data.choice import LETTERS, choice_prompt, crr_prompt, rec_prompt, ssr_prompt
from mukv.data.rvs import LazySource, confine_to_root, read_record_list, resolve_video_path
from mukv.data.types import Question, VideoSample
from mukv.errors import DataError, VideoError

BACKWARD_TASKS: tuple[str, ...] = ("EPM", "ASI", "HLD")
REALTIME_TASKS: tuple[str, ...] = ("STU", "OJR", "ATR", "ACR", "OCR", "FPD")
FORWARD_TASKS: tuple[str, ...] = ("REC", "SSR", "CRR")
TASKS: tuple[str, ...] = BACKWARD_TASKS + REALTIME_TASKS + FORWARD_TASKS
# The leaderboard's three categories (task -> category: the question type's category in metrics.json)
TASK_CATEGORIES: dict[str, tuple[str, ...]] = {"backward": BACKWARD_TASKS, "realtime": REALTIME_TASKS,
                                               "forward": FORWARD_TASKS}
MULTIPLE_CHOICE_TASKS: tuple[str, ...] = BACKWARD_TASKS + REALTIME_TASKS


def category_of(task: str) -> str:
    return next(c for c, tasks in TASK_CATEGORIES.items() if task in tasks)


class _Record:
    """One record under validation: every error names the file, the record and the field."""

    def __init__(self, path: Path, index: int, data: Any) -> None:
        self.path, self.index, self.data = path, index, data
        self.label: str = f"#{index}"
        if not isinstance(data, dict):
            raise DataError(path, f"expected an object, got {type(data).__name__}", record=self.label)

    def fail(self, field: str, message: str) -> DataError:
        return DataError(self.path, message, record=self.label, field=field)

    def get(self, field: str, container: dict | None = None, where: str | None = None) -> Any:
        source = self.data if container is None else container
        if field not in source:
            raise self.fail(where or field, "missing field")
        return source[field]

    def text(self, field: str, container: dict | None = None, where: str | None = None) -> str:
        value = self.get(field, container, where)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where or field, f"must be a non-empty string, got {value!r}")
        return value

    def time(self, field: str, container: dict | None = None, where: str | None = None) -> float:
        value = self.get(field, container, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise self.fail(where or field, f"must be a finite non-negative number of seconds, got {value!r}")
        return float(value)

    def integer(self, field: str, container: dict | None = None, where: str | None = None,
                choices: Sequence[int] | None = None) -> int:
        value = self.get(field, container, where)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (choices and value not in choices):
            wanted = f"one of {', '.join(map(str, choices))}" if choices else "a non-negative integer"
            raise self.fail(where or field, f"must be {wanted}, got {value!r}")
        return value

    def probes(self) -> list[dict[str, Any]]:
        probes = self.get("test_info")
        if not isinstance(probes, list) or not probes:
            raise self.fail("test_info", "must be a non-empty list of probes")
        for j, probe in enumerate(probes):
            if not isinstance(probe, dict):
                raise self.fail(f"test_info[{j}]", f"expected an object, got {type(probe).__name__}")
        return probes


def _ask_time(realtime: float, sample_fps: float) -> float:
    """When a question asked at ``realtime`` is answered: the end of the official clip (``ceil``), at least the
    first sampled frame's time (so that the stream has shown a frame)."""
    return max(float(math.ceil(realtime)), 1.0 / sample_fps)


def _questions(rec: _Record, task: str, rid: int, sample_fps: float) -> list[Question]:
    """The questions of a validated record's task (raises on a malformed field)."""
    base = {"ovo_id": rid, "task": task, "category": category_of(task)}
    if task in MULTIPLE_CHOICE_TASKS:
        question = rec.text("question")
        options = rec.get("options")
        if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
            raise rec.fail("options", f"must be a list of 2 to {len(LETTERS)} options, got {options!r:.80}")
        for k, option in enumerate(options):
            if not isinstance(option, str) or not option.strip():
                raise rec.fail(f"options[{k}]", f"must be a non-empty string, got {option!r}")
        gt = rec.integer("gt")
        if gt >= len(options):
            raise rec.fail("gt", f"must index one of the {len(options)} options (0-{len(options) - 1}), got {gt}")
        realtime = rec.time("realtime")
        meta = {**base, "realtime": realtime, "options": list(options), "gt": gt}
        if isinstance(rec.data.get("answer"), str):
            meta["answer_text"] = rec.data["answer"]
        end = _ask_time(realtime, sample_fps)
        return [Question(qid=f"ovo{rid}", question=choice_prompt(question, options), answer=LETTERS[gt],
                         start_time=0.0, end_time=end, qtype=task, meta=meta)]
    probes = rec.probes()
    if task == "REC":
        activity = rec.text("activity")
    elif task == "CRR":
        question = rec.text("question")
    out = []
    for j, probe in enumerate(probes):
        where = f"test_info[{j}]"
        realtime = rec.time("realtime", probe, f"{where}.realtime")
        meta = {**base, "realtime": realtime, "probe": j}
        if task == "REC":
            count = rec.integer("count", probe, f"{where}.count")
            text, answer = rec_prompt(activity), str(count)
            meta["activity"] = activity
        else:
            kind = rec.integer("type", probe, f"{where}.type", choices=(0, 1))
            answer = "Yes" if kind == 1 else "No"
            if task == "SSR":
                step = rec.text("step", probe, f"{where}.step")
                text = ssr_prompt(step)
                meta["step"] = step
            else:
                text = crr_prompt(question)
                meta.update({k: rec.data[k] for k in ("ask_time", "clue_time") if k in rec.data})
            meta["type"] = kind
        out.append(Question(qid=f"ovo{rid}_p{j}", question=text, answer=answer, start_time=0.0,
                            end_time=_ask_time(realtime, sample_fps), qtype=task, meta=meta))
    return out


def read_annotation(path: str | Path) -> list[Any]:
    """The file's JSON list; a :class:`DataError` for a missing file, bad JSON or another top-level value."""
    return read_record_list(Path(path), "records", "an OVO-Bench annotation file")


def load_ovo_bench(
    path: str | Path,
    data_root: str | Path,
    sample_fps: float,
    *,
    tasks: Iterable[str] | None = None,
    limit_videos: int | None = None,
    video_ids: Sequence[str] | None = None,
    check_videos: bool = False,
    allow_outside_root: bool = False,
) -> list[VideoSample]:
    """Read and validate an OVO-Bench annotation file (every record, whatever the selection), then one
    :class:`VideoSample` per source video holding the questions of ``tasks`` (all twelve by default), in the
    order the videos first appear. ``video_ids`` (the records' ``video`` paths) keeps those; ``limit_videos``
    the first ``n``; ``check_videos`` checks that every selected video file exists."""
    path = Path(path)
    wanted = list(TASKS if tasks is None else tasks)
    unknown = [t for t in wanted if t not in TASKS]
    if unknown:
        raise DataError(path, f"unknown task(s) {unknown}; OVO-Bench's tasks: {', '.join(TASKS)}", field="tasks")
    root = None if allow_outside_root else Path(os.path.realpath(data_root))
    videos: dict[str, dict[str, Any]] = {}
    seen: dict[int, int] = {}
    for index, data in enumerate(read_annotation(path)):
        rec = _Record(path, index, data)
        rid = rec.get("id")
        if isinstance(rid, bool) or not isinstance(rid, int):
            raise rec.fail("id", f"must be an integer, got {rid!r}")
        rec.label = f"#{index} (id {rid})"
        if rid in seen:
            raise rec.fail("id", f"repeats the id of record #{seen[rid]}")
        seen[rid] = index
        task = rec.get("task")
        if task not in TASKS:
            raise rec.fail("task", f"must be one of {', '.join(TASKS)}, got {task!r}")
        video = rec.text("video")
        questions = _questions(rec, task, rid, sample_fps)
        entry = videos.get(video)
        if entry is None:
            local = resolve_video_path(video, data_root, prefix=None)
            if root is not None:
                confine_to_root(path, video, local, root, record=rec.label, field="video")
            entry = videos[video] = {"local": local, "questions": [], "ids": []}
        entry["ids"].append(rid)
        if task in wanted:
            entry["questions"] += questions

    samples = []
    for video, entry in videos.items():
        if not entry["questions"]:  # none of its records is of a selected task
            continue
        questions = sorted(entry["questions"], key=lambda q: q.end_time)  # stable: ties keep file order
        samples.append(VideoSample(
            video_id=video, duration=questions[-1].end_time, questions=questions,
            source=LazySource(entry["local"], sample_fps),
            meta={"video_path": str(entry["local"]), "annotation_video_path": video, "annotation_file": str(path),
                  "record_ids": entry["ids"]}))
    if video_ids is not None:
        known = {s.video_id for s in samples}
        missing = [v for v in video_ids if v not in known]
        if missing:
            raise DataError(path, f"video_ids with no question of the selected tasks in this file: {_few(missing)}",
                            field="video")
        keep = set(video_ids)
        samples = [s for s in samples if s.video_id in keep]
    if limit_videos is not None:
        samples = samples[:limit_videos]
    if check_videos:
        absent = [str(s.meta["video_path"]) for s in samples if not Path(s.meta["video_path"]).is_file()]
        if absent:
            raise VideoError(absent[0], f"{len(absent)} of {len(samples)} videos of {path} not found under data root "
                                        f"{data_root}: {_few(absent)}")
    return samples


def _few(items: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(items[:k])
    return shown + (f" ... and {len(items) - k} more" if len(items) > k else "")


# ------------------------------------------------------------------------------------------------- scoring
def score_result_files(paths: Iterable[str | Path], annotation: str | Path | None = None) -> dict[str, tuple[int, int]]:
    """Per task (correct, total) of the official evaluation's result files (``results/<model>/*.json``: lists
    ``backward``, ``realtime``, ``forward`` of records with the model's ``response``), scored by
    ``judge=choice`` (:class:`mukv.judge.choice.ChoiceJudge`) against each item's ``ground_truth`` letter, each
    REC probe's ``count`` and each SSR / CRR probe's ``type``; a missing response (``null``) is wrong. With
    ``annotation`` (the OVO-Bench file) the items' options bound the letters and are matched as text.

    This is how the reference row of ``experiments/grids/ovo.yaml`` was computed from the LLaVA-OneVision
    result files the official repository ships (the counts are stored there, the files are not)."""
    from mukv.judge.choice import ChoiceJudge

    options: dict[int, list[str]] = {}
    if annotation is not None:
        options = {r["id"]: r["options"] for r in read_annotation(annotation) if isinstance(r, dict) and "options" in r}
    judge, tally = ChoiceJudge(), {}

    def add(task: str, question: str, reference: str, response: Any) -> None:
        ok = response is not None and judge.judge(question, reference, str(response)).correct is True
        right, total = tally.get(task, (0, 0))
        tally[task] = (right + int(ok), total + 1)

    for file in paths:
        result = json.loads(Path(file).read_text())
        for item in [*result.get("backward", []), *result.get("realtime", [])]:
            opts = options.get(item["id"])
            question = choice_prompt(item["question"], opts) if opts else item["question"]
            add(item["task"], question, item["ground_truth"], item["response"])
        for item in result.get("forward", []):
            for probe in item["test_info"]:
                reference = str(probe["count"]) if item["task"] == "REC" else ("Yes" if probe["type"] == 1 else "No")
                add(item["task"], "", reference, probe.get("response"))
    return {t: tally[t] for t in TASKS if t in tally}
