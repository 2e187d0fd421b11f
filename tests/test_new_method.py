"""A new cache method is one Python file in mukv/cache/ plus one conf/cache/<name>.yaml, and nothing else: written
into a temporary copy of the repository, it shows up in `make run` (the quick nano benchmark), `make bench`,
`make reproduce-table` and the sweeps (Hydra presets and the generated W&B specs), with its own place in the
order and its own budget rule. Everything runs on the copy (PYTHONPATH), with small presets and tiny models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # the virtual environment running the tests (make's VENV)
NAME = "throwaway"
METHOD = '''"""A throwaway method written by tests/test_new_method.py: a sliding window at half the budget."""

from __future__ import annotations

from dataclasses import dataclass

from mukv.cache.base import register_cache
from mukv.cache.sliding_window import SlidingWindowCache


@register_cache("throwaway")
@dataclass
class ThrowawayCache(SlidingWindowCache):
    display_order = 15  # between sliding_window (10) and uniform (20)
    n_local: int = 15000

    @classmethod
    def budget_knobs(cls, frames: int, tokens_per_frame: int) -> dict:
        return {"n_local": max(1, frames // 2) * tokens_per_frame}
'''
CONFIG = """# A throwaway method (tests/test_new_method.py)
defaults:
  - throwaway_schema
  - _self_
n_local: 15000
"""
PRESSES = ["knorm", "streaming_llm", "tova", "snapkv", "expected_attention"]  # keep_ratio: no token budget
ORDER = ["full", "sliding_window", NAME, "uniform", "rekv", "mukv", "streamkv", "infinipot_v", "hermes", *PRESSES]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A copy of the working tree (tracked and untracked files git does not ignore) plus the two new files."""
    copy = tmp_path_factory.mktemp("repo")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file() and not src.is_symlink():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy / rel)
    (copy / "mukv" / "cache" / f"{NAME}.py").write_text(METHOD)
    (copy / "conf" / "cache" / f"{NAME}.yaml").write_text(CONFIG)
    return copy


def run(repo: Path, *cmd: str, timeout: int = 300, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MUKV_OUTPUTS", "MUKV_DRY_RUN")}
    env.update({"PYTHONPATH": str(repo), "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0",
                "MUKV_OUTPUTS": str(repo / "outputs"), **extra})
    proc = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout[-2500:] + proc.stderr[-2500:]
    return proc


def make(repo: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    """`make` in the copy with this test's interpreter (the copy has no .venv of its own)."""
    return run(repo, "make", "--no-print-directory", f"VENV={VENV}", "-o", f"{VENV}/.installed-dev", *args, **extra)


def test_the_copy_sees_the_new_method(repo):
    proc = run(repo, sys.executable, "-m", "mukv.sweeps", "methods")
    assert proc.stdout.strip() == ",".join(ORDER)  # the registry, in display order
    budgeted = [m for m in ORDER if m not in ("full", *PRESSES)]
    assert run(repo, sys.executable, "-m", "mukv.sweeps", "methods", "budget").stdout.strip() == ",".join(budgeted)
    assert not (ROOT / "mukv" / "cache" / f"{NAME}.py").exists()  # the working tree is untouched


def test_make_run_benchmarks_the_new_method(repo):
    """`make run` is the quick nano benchmark: the new method gets its row, in its place, at the preset's budget
    mapped through its own budget_knobs (16 frames -> a window of 8 frames)."""
    assert "experiments/nano_benchmark.py --preset quick" in make(repo, "-n", "run").stdout
    out = repo / "outputs" / "quick"
    run(repo, sys.executable, "experiments/nano_benchmark.py", "--preset", "quick", "--videos", "1", "--lengths", "20",
        "--out", str(out))
    table = pd.read_csv(out / "results.csv")
    assert list(table.method) == ORDER
    metrics = json.loads((out / "runs" / f"{NAME}_b16_L20" / "metrics.json").read_text())
    assert metrics["method"] == NAME and metrics["budget_knobs"] == {"n_local": 8 * 16}
    assert f"| {NAME} | 16 |" in (out / "results.md").read_text()


def test_make_bench_times_the_new_method(repo):
    out = repo / "outputs" / "bench.json"
    proc = make(repo, "bench", f"BENCH_ARGS=--model tiny --dtype fp32 --frames 2 --chunk 2 --new-tokens 1 --out {out}")
    assert [r["method"] for r in json.loads(out.read_text())["rows"]] == ORDER
    assert f"| {NAME} |" in proc.stdout


def test_make_reproduce_table_has_the_new_method(repo):
    grid = repo / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "new", "experiment": "smoke", "model": "tiny", "datasets": ["synthetic"],
                                    "methods": "all"}))  # main points only: six short jobs
    out = repo / "outputs" / "table"
    make(repo, "reproduce-table", f"OUT={out}", f"ARGS=--grid {grid} dataset.synthetic.duration_s=12 "
         "dataset.synthetic.questions_per_video=1 engine.max_new_tokens=1")
    table = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert list(table.method) == ORDER and (table.role == "main").all()
    # the shipped grids name the registry: both list the new method, the synthetic one with its budget points
    code = ("import sys; sys.path.insert(0, 'experiments'); import reproduce_table as rt; "
            "[print(p.name) for d in ('synthetic', 'rvs') "
            "for p in rt.grid_points(rt.load_grid(rt.GRIDS / f'{d}.yaml'), rt.available_methods())]")
    names = run(repo, sys.executable, "-c", code).stdout.split()
    assert sum(n.endswith(f"{NAME}_main") for n in names) == 2
    assert [n.split("_", 1)[1] for n in names if NAME in n] == [f"{NAME}_main", f"{NAME}_b4", f"{NAME}_b16", f"{NAME}_main"]


def test_sweeps_run_the_new_method(repo):
    for args, expected in ((["experiment=sweep/video_length", "dataset.max_minutes=5"], ORDER),
                           (["experiment=sweep/budget", "budget_frames=8"],
                            [m for m in ORDER if m not in ("full", *PRESSES)])):  # the methods with a budget
        proc = run(repo, sys.executable, "-m", "mukv.run", "-m", *args, MUKV_DRY_RUN="1")
        assert re.findall(r"dry run .*: .*\bcache=(\w+)", proc.stdout) == expected
    spec = yaml.safe_load(run(repo, sys.executable, "-m", "mukv.sweeps", "wandb", "experiment=sweep/video_length").stdout)
    assert spec["parameters"]["cache"]["values"] == ORDER


def readme_worked_example() -> tuple[str, str]:
    """The Python file and the YAML of README.md's worked example, as printed there."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Worked example", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    config = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return code, config


def test_the_readme_worked_example_runs_as_printed(tmp_path_factory):
    """The README's new method, copied verbatim into a fresh copy: it runs, takes its budget, refuses a bad knob."""
    code, config = readme_worked_example()
    name = re.search(r'@register_cache\("(\w+)"\)', code).group(1)
    copy = tmp_path_factory.mktemp("readme_repo")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file() and not (ROOT / rel).is_symlink():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, copy / rel)
    (copy / "mukv" / "cache" / f"{name}.py").write_text(code)
    (copy / "conf" / "cache" / f"{name}.yaml").write_text(config)
    out = copy / "outputs" / "example"
    run(copy, sys.executable, "-m", "mukv.run", f"cache={name}", "experiment=smoke", "cache.stride=4", "budget_frames=2",
        f"hydra.run.dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == name and metrics["budget_knobs"] == {"n_local": 2 * 16}
    rows = pd.read_csv(out / "predictions.csv")
    # the nano model's 11 init tokens + the window of 2 kept frames of 16 tokens (the streams show 15 and 19 frames)
    assert (rows.frames_seen > 8).all() and (rows.online_tokens == 11 + 2 * 16).all()
    env = {k: v for k, v in os.environ.items() if k != "MUKV_OUTPUTS"}
    bad = subprocess.run([sys.executable, "-m", "mukv.run", f"cache={name}", "cache.stride=0"], cwd=copy,
                         env={**env, "PYTHONPATH": str(copy), "MUKV_OUTPUTS": str(copy / "outputs")},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cache.stride" in bad.stderr, bad.stderr[-2000:]
