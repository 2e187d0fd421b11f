"""Experiments: multiruns (joblib and submitit local launchers), sharding and merging, W&B grouping, dataset
truncation, sweep presets and the W&B sweep specs generated from them, `make reproduce-table` and its
missing-input report, the nano benchmark (`make run`) through the entry point."""

from __future__ import annotations

import itertools
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
from conftest import compose_cfg
from hydra.core.override_parser.overrides_parser import OverridesParser
from wandb_reader import read_records, summary_and_config

from mukv.cache import budget_knobs, ordered_methods
from mukv.config import register_configs
from mukv.train_eval import build_dataset, shard

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_RVS = ROOT.parent / "shared" / "data" / "rvs"
register_configs()
METHODS = set(ordered_methods())
TIMING = ["encode_s", "recall_s", "ttft_s", "latency_s"]
SMALL = ("model=tiny", "experiment=smoke", "dataset.synthetic.num_videos=2", "engine.max_new_tokens=2")


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}


def mukv_run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mukv.run", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def merge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mukv.report.merge", *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)



def job_dirs(sweep: Path) -> dict[tuple[str, int], Path]:
    """(method, shard index) -> job folder of a multirun."""
    out = {}
    for d in sorted(p for p in sweep.iterdir() if (p / "resolved_config.yaml").is_file()):
        cfg = yaml.safe_load((d / "resolved_config.yaml").read_text())
        out[(cfg["cache"]["_target_"].split(".")[-2], cfg["dataset"]["shard_index"])] = d
    return out


def predictions(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path / "predictions.csv", keep_default_na=False)
    return df.drop(columns=TIMING).sort_values(["video_id", "end_time", "qid"]).reset_index(drop=True)


# ---------------------------------------------------------------------------- multirun, shards, merge
@pytest.fixture(scope="module")
def sharded_multirun(tmp_path_factory):
    """2x2 multirun (cache x shard) on the joblib launcher, and the unsharded full run with W&B."""
    base = tmp_path_factory.mktemp("multirun")
    sweep = base / "sweep"
    proc = mukv_run("-m", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", "cache=full,sliding_window",
                    "dataset.num_shards=2", "dataset.shard_index=0,1", *SMALL, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = base / "single"
    proc = mukv_run(*SMALL, "cache=full", "logger=wandb", "task_name=exp_test", "tags=[mine]",
                    f"hydra.run.dir={single}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep, single, base


def test_shards_partition_the_videos_deterministically():
    videos = list(range(7))
    parts = [shard(videos, i, 3) for i in range(3)]
    assert sorted(itertools.chain(*parts)) == videos and parts == [shard(videos, i, 3) for i in range(3)]
    assert [len(p) for p in parts] == [3, 2, 2] and shard(videos, 0, 1) == videos


def test_multirun_2x2_then_merged_shards_equal_the_unsharded_run(sharded_multirun):
    sweep, single, base = sharded_multirun
    jobs = job_dirs(sweep)
    assert set(jobs) == {("full", 0), ("full", 1), ("sliding_window", 0), ("sliding_window", 1)}
    shard_videos = [set(pd.read_csv(jobs[("full", i)] / "memory_stats.csv").video_id) for i in (0, 1)]
    assert len(shard_videos[0]) == len(shard_videos[1]) == 1 and not shard_videos[0] & shard_videos[1]

    merged = base / "merged_full"
    proc = merge(jobs[("full", 1)], jobs[("full", 0)], "--out", merged)
    assert proc.returncode == 0, proc.stderr
    pd.testing.assert_frame_equal(predictions(merged), predictions(single))
    m_merged = json.loads((merged / "metrics.json").read_text())
    m_single = json.loads((single / "metrics.json").read_text())
    for key in ("questions", "videos", "judged", "invalid_judgments", "accuracy", "mean_score", "mean_online_tokens",
                "kv_bytes_total", "kv_gb_per_hour", "peak_kv_bytes", "frames_encoded", "by_age", "by_type"):
        assert m_merged[key] == m_single[key], key
    assert m_merged["merged_shards"] == [0, 1] and m_merged["missing_shards"] == []
    mem = pd.read_csv(merged / "memory_stats.csv")
    assert sorted(mem.video_id) == sorted(pd.read_csv(single / "memory_stats.csv").video_id)

    # The other method's shards merge too; mixing methods or repeating a shard is refused.
    assert merge(jobs[("sliding_window", 0)], jobs[("sliding_window", 1)], "--out", base / "m_sw").returncode == 0
    bad = merge(jobs[("full", 0)], jobs[("sliding_window", 1)], "--out", base / "bad")
    assert bad.returncode == 2 and "cache._target_" in bad.stderr and "Traceback" not in bad.stderr
    twice = merge(jobs[("full", 0)], jobs[("full", 0)], "--out", base / "twice")
    assert twice.returncode == 2 and "more than once" in twice.stderr
    part = merge(jobs[("full", 0)], "--out", base / "part")
    assert part.returncode == 0 and "shards [1] of 2 are missing" in part.stderr
    strict = merge(jobs[("full", 0)], "--out", base / "part2", "--require-complete")
    assert strict.returncode == 2


def test_wandb_run_is_grouped_tagged_and_has_the_figures(sharded_multirun):
    _, single, _ = sharded_multirun
    (run_dir,) = (single / "wandb").glob("offline-run-*")
    (run,) = [r.run for r in read_records(next(run_dir.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "exp_test" and run.job_type == "eval"
    assert {"mine", "method:full", "dataset:synthetic", "model:tiny"} <= set(run.tags)
    summary, config, _ = summary_and_config(run_dir)
    assert summary["accuracy"] == json.loads((single / "metrics.json").read_text())["accuracy"]
    assert any(k.startswith("by_age/") for k in summary) and config["task_name"] == "exp_test"
    images = {p.name.split("_")[0] for p in (run_dir / "files" / "media" / "images" / "figures").glob("*.png")}
    assert images == {"accuracy", "stream"}
    assert (single / "figures" / "accuracy_by_age.png").stat().st_size > 5000


def test_submitit_local_launcher_runs_the_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = mukv_run("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "cache=full,uniform",
                    *SMALL, "dataset.synthetic.num_videos=1", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert [m["method"] for m in metrics] == ["full", "uniform"] and all(m["questions"] == 2 for m in metrics)
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # the jobs ran through submitit


def test_slurm_launcher_preset_composes():
    cfg = compose_cfg("hydra/launcher=slurm", hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1
    assert compose_cfg("hydra/launcher=local_parallel", hydra_cfg=True).hydra.launcher._target_.endswith("JoblibLauncher")


# ------------------------------------------------------------------------------------- dataset options
def test_max_minutes_truncates_streams():
    full = build_dataset(compose_cfg("dataset.synthetic.num_videos=2", "dataset.synthetic.duration_s=120",
                                     "dataset.synthetic.questions_per_video=6"))
    cut = build_dataset(compose_cfg("dataset.synthetic.num_videos=2", "dataset.synthetic.duration_s=120",
                                    "dataset.synthetic.questions_per_video=6", "dataset.max_minutes=1"))
    kept = {q.qid for v in cut for q in v.questions}
    assert kept == {q.qid for v in full for q in v.questions if q.end_time <= 60}
    assert 0 < len(kept) < sum(len(v.questions) for v in full)


@pytest.mark.parametrize("override,field", [("dataset.shard_index=2", "dataset.shard_index"),
                                            ("dataset.num_shards=0", "dataset.num_shards"),
                                            ("dataset.max_minutes=-1", "dataset.max_minutes"),
                                            ("dataset.age_buckets_s=[10,5]", "dataset.age_buckets_s")])
def test_bad_experiment_options_name_the_field(override, field):
    from mukv.errors import ConfigError
    from mukv.train_eval import validate_config

    with pytest.raises(ConfigError) as err:
        validate_config(compose_cfg("dataset.num_shards=2", override))
    assert err.value.field == field


# ----------------------------------------------------------------------------- presets and sweep specs
def needed_methods(text: str) -> set[str]:
    return set(re.findall(r"override /cache: (\w+)", text))


def sweep_choices(key: str, value) -> list[str]:
    override = OverridesParser.create().parse_override(f"{key}={value}")
    return [f"{key}={v}" for v in override.sweep_string_iterator()] if override.is_sweep_override() else [f"{key}={value}"]


PRESETS = sorted(p.relative_to(CONF / "experiment").with_suffix("").as_posix()
                 for p in (CONF / "experiment").rglob("*.yaml") if not p.parts[-2] == "mukv_mix")


@pytest.mark.parametrize("preset", PRESETS)
def test_experiment_presets_and_their_sweeps_compose(preset):
    text = (CONF / "experiment" / f"{preset}.yaml").read_text()
    if needed_methods(text) - METHODS:
        pytest.skip(f"needs cache methods not implemented yet: {needed_methods(text) - METHODS}")
    cfg = compose_cfg(f"experiment={preset}", hydra_cfg=True)
    params = cfg.hydra.sweeper.params or {}
    for key, value in params.items():
        for choice in sweep_choices(key, value):
            if key == "cache" and choice.split("=")[1] not in METHODS:
                continue
            if key.startswith("+experiment/mukv_mix") and "mukv" not in METHODS:
                continue
            point = compose_cfg(f"experiment={preset}", choice)
            assert point.task_name == cfg.task_name


@pytest.mark.skipif("mukv" not in METHODS, reason="mukv is not implemented yet")
@pytest.mark.parametrize("mix", sorted(p.stem for p in (CONF / "experiment" / "mukv_mix").glob("*.yaml")))
def test_granularity_mixes_compose(mix):
    cfg = compose_cfg("cache=mukv", f"+experiment/mukv_mix={mix}")
    assert len(cfg.cache.granularities) == len(cfg.cache.top_k) == len(cfg.cache.keep_ratio) == len(cfg.cache.alpha)


SWEEP_PRESETS = sorted(p.stem for p in (CONF / "experiment" / "sweep").glob("*.yaml"))
SPEC_COMMANDS = [[f"experiment=sweep/{p}", "model=llava_ov_0.5b", "dataset=rvs_ego", "judge=openai"] for p in SWEEP_PRESETS]
SPEC_COMMANDS.append(["experiment=smoke", "model=tiny", "cache=full,sliding_window,uniform", "engine.max_new_tokens=2,4"])


def test_sweeps_folder_holds_no_copy_of_a_grid():
    """One copy of each grid: the Hydra presets; W&B specs are generated (mukv.sweeps), not kept in sweeps/."""
    assert sorted(p.name for p in (ROOT / "sweeps").iterdir()) == ["README.md"]
    assert "python -m mukv.sweeps wandb" in (ROOT / "sweeps" / "README.md").read_text()


def test_sweep_presets_take_their_methods_from_the_registry():
    """video_length runs every method of the registry and budget every method with a budget, each point with
    budget_frames mapped through the method's budget_knobs."""
    from mukv.cache import budget_knobs
    from mukv.sweeps import sweep_grid

    _, grid = sweep_grid(["experiment=sweep/video_length"])
    assert grid["cache"] == ordered_methods() and grid["dataset.max_minutes"] == [5, 10, 20, 40, 60]
    _, grid = sweep_grid(["experiment=sweep/budget"])
    assert grid["cache"] == [m for m in ordered_methods() if budget_knobs(m, 1, 1)] and "full" not in grid["cache"]
    assert grid["budget_frames"] == [8, 16, 32, 64]
    fixed, grid = sweep_grid(["experiment=sweep/budget", "cache=rekv", "budget_frames=16,32"])  # command line narrows
    assert fixed == ["experiment=sweep/budget", "cache=rekv"] and grid == {"budget_frames": [16, 32]}


@pytest.mark.parametrize("args", SPEC_COMMANDS, ids=lambda a: a[0].split("=")[1])
def test_wandb_sweep_specs_drive_the_entry_point(args, tmp_path):
    """The generated spec of every preset: its command runs mukv.run with the fixed overrides, and each point
    passed by a W&B agent (args_no_hyphens) composes to the point's values."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from mukv.sweeps import main as sweeps_main
    from mukv.sweeps import wandb_spec

    spec = wandb_spec(args)
    assert spec["method"] in ("grid", "random", "bayes") and spec["metric"]["name"] == "accuracy"
    command = spec["command"]
    assert command[:4] == ["${env}", "${interpreter}", "-m", "mukv.run"] and command[-1] == "${args_no_hyphens}"
    fixed = [c for c in command[4:-1]]
    assert "logger=wandb" in fixed and [a for a in args if "," not in a] == fixed[:len(fixed) - 2]
    keys = list(spec["parameters"])
    composed = 0
    for values in itertools.product(*(spec["parameters"][k]["values"] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        sweep_args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})["args_no_hyphens"]
        cfg = compose_cfg(*fixed, *sweep_args)
        for k, v in point.items():
            if not k.startswith("+") and k != "cache":
                got = cfg
                for part in k.split("."):
                    got = got[part]
                assert (list(got) if isinstance(v, list) else got) == v, k
        composed += 1
    assert composed == len(list(itertools.product(*(spec["parameters"][k]["values"] for k in keys))))
    out = tmp_path / "spec.yaml"
    assert sweeps_main(["wandb", *args, "--out", str(out)]) == 0  # the file `wandb sweep` reads
    assert yaml.safe_load(out.read_text()) == spec


def test_wandb_dashboard_spec_builds_offline():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import wandb_dashboard
    finally:
        sys.path.pop(0)
    workspace = wandb_dashboard.build_workspace("entity", "mukv", group="reproduce_rvs")
    view = workspace._to_model()  # the server payload, built without contacting the server
    assert sum(len(s.panels) for s in workspace.sections) >= 10 and "accuracy" in view.model_dump_json()


# ------------------------------------------------------------------------------------- reproduce-table
def test_make_reproduce_table_renders_table_and_figures(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "test", "title": "Test grid", "experiment": "smoke", "model": "tiny", "datasets": ["synthetic"],
        "methods": ["full", "sliding_window"], "budget_frames": [2]}))
    out = tmp_path / "out"
    proc = subprocess.run(["make", "-o", ".venv/.installed-dev", "reproduce-table", f"OUT={out}",
                           f"ARGS=--grid {grid} engine.max_new_tokens=2"], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert list(zip(table.method, table.role, strict=True)) == [("full", "main"), ("sliding_window", "main"),
                                                   ("sliding_window", "budget")]  # full has no budget: main only
    metrics = json.loads((Path(table.run_dir.iloc[2]) / "metrics.json").read_text())
    n_local = metrics["budget_knobs"]["n_local"]  # budget_frames=2 through sliding_window's budget_knobs: 2 frames
    assert metrics["budget_frames"] == 2 and list(metrics["budget_knobs"]) == ["n_local"] and n_local % 2 == 0
    assert 0 < n_local < 15000
    assert (table.questions == 2).all() and table.setting.iloc[2] == f"budget_frames=2, n_local={n_local}"
    md = (out / "results.md").read_text()
    assert "# Test grid" in md and f"| sliding_window | budget_frames=2, n_local={n_local} |" in md
    for name in ("accuracy_vs_online_tokens", "accuracy_vs_question_age", "memory_latency_vs_length"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
    assert "3 of 3 run(s) finished" in proc.stdout


def test_shipped_grids_name_the_registry_and_budgets_in_frames(tmp_path):
    """Both grids run every method of the registry; the synthetic one adds one run per budget in frames for each
    method that has a budget (full: main only)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import reproduce_table as rt
    finally:
        sys.path.pop(0)
    from mukv.cache import budget_knobs

    for data in ("synthetic", "rvs"):
        grid = rt.load_grid(rt.GRIDS / f"{data}.yaml")
        assert grid["methods"] == "all" and rt.grid_methods(grid)[:len(METHODS)] == ordered_methods()
    grid = rt.load_grid(rt.GRIDS / "synthetic.yaml")
    points = rt.grid_points(grid, ordered_methods())
    assert [(p.method, p.budget_frames) for p in points if p.role == "main"] == [(m, None) for m in ordered_methods()]
    budgeted = [m for m in ordered_methods() if budget_knobs(m, 1, 1)]
    assert [(p.method, p.budget_frames) for p in points if p.role == "budget"] == [
        (m, b) for m in budgeted for b in grid["budget_frames"]]
    assert "budget_frames: 4\n" in next(p for p in points if p.budget_frames == 4).config()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiment": "smoke", "datasets": ["synthetic"], "methods": "all",
                                   "budget_frames": [0]}))
    with pytest.raises(rt.GridError, match="budget_frames"):
        rt.load_grid(bad)


def test_reproduce_rvs_says_exactly_what_is_missing(tmp_path):
    (tmp_path / "rvs").mkdir()
    shutil.copy(SHARED_RVS / "ego4d_oe.json", tmp_path / "rvs" / "ego4d_oe.json")  # annotations but no videos
    run_env = {k: v for k, v in env().items() if k not in ("OPENAI_API_KEY", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    run_env["HF_HOME"] = str(tmp_path / "hf")
    proc = subprocess.run([sys.executable, "experiments/reproduce_table.py", "--data", "rvs", "--out",
                           str(tmp_path / "out"), f"paths.data_dir={tmp_path}"], cwd=ROOT, env=run_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and "cannot reproduce 'RVS" in err
    assert f"annotation file not found: {tmp_path}/rvs/movienet_oe.json" in err
    assert "videos of" in err and "not found" in err and str(tmp_path / "rvs" / "ego") in err
    assert "llava-hf/llava-onevision-qwen2-0.5b-ov-hf is not in the Hugging Face cache" in err
    assert "OPENAI_API_KEY" in err
    for method in {"rekv", "mukv"} - METHODS:
        assert f"cache method '{method}' is not implemented" in err
    assert not (tmp_path / "out" / "runs").exists()  # nothing ran


def _nano_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("nano_benchmark", ROOT / "experiments" / "nano_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nano_benchmark_quick_preset_runs_every_method(tmp_path):
    """`make run` (no arguments) is this preset: every method of the registry streams and answers with the nano
    model, each point one run of the entry point (train_eval) in its own run folder, budgets through
    budget_frames; ReKV's encoding window is the preset's one nano-specific override."""
    df = _nano_benchmark().main(["--preset", "quick", "--videos", "1", "--lengths", "60", "--out", str(tmp_path)])
    assert list(df.method) == ordered_methods() and (df.questions == 5).all()
    assert (tmp_path / "results.md").read_text().count("\n| 60 |") == len(METHODS)
    assert df.set_index("method").loc["sliding_window", "online_tokens"] < df.set_index("method").loc["full", "online_tokens"]
    runs = {p.name: p for p in (tmp_path / "runs").iterdir()}
    assert set(runs) == {f"{m}_{'b16' if budget_knobs(m, 1, 16) else 'all'}_L60" for m in ordered_methods()}
    rekv = json.loads((runs["rekv_b16_L60"] / "metrics.json").read_text())
    assert rekv["budget_frames"] == 16 and rekv["budget_knobs"] == {"retrieve_size": 16}
    cache = yaml.safe_load((runs["rekv_b16_L60"] / "resolved_config.yaml").read_text())["cache"]
    assert cache["n_local"] == 512 and cache["retrieve_size"] == 16 and "block_size" not in cache
    assert json.loads(df.set_index("method").loc["rekv", "knobs"]) == {"n_local": 512, "retrieve_size": 16}
    full = json.loads((runs["full_all_L60"] / "metrics.json").read_text())
    assert full["budget_frames"] is None and df.set_index("method").loc["full", "budget"] == "all"
    # device KV at the answers: never above the peak held (uniform sampling holds none); ReKV's store is in host memory
    by = df.set_index("method")
    assert (by.device_kv_mib <= by.kv_mib * (1 + 1e-9)).all() and by.drop("uniform").device_kv_mib.gt(0).all()
    assert by.loc["rekv", "device_kv_mib"] < 0.5 * by.loc["rekv", "kv_mib"]
    assert "device_kv_mib" in (tmp_path / "results.md").read_text()


def test_nano_benchmark_reports_categories_pairs_with_full_and_flags_extrapolation(tmp_path):
    """Each row: memory / recency / cross-frame accuracy with intervals, the difference to the full cache on the
    same questions (paired by qid, McNemar p), and the share of answers past the trained positions."""
    from mukv.report.compare import compare

    df = _nano_benchmark().main(["--preset", "quick", "--videos", "2", "--lengths", "100", "--methods", "full",
                                 "sliding_window", "--out", str(tmp_path)]).set_index("method")
    for cat in ("memory", "recency", "cross_frame"):
        assert ((df[f"{cat}_lo"] <= df[cat]) & (df[cat] <= df[f"{cat}_hi"])).all()
    assert df[["memory_n", "recency_n", "cross_frame_n"]].sum(axis=1).eq(df.questions).all()
    assert pd.isna(df.loc["full", "vs_full_diff"])
    paired = compare(pd.read_csv(tmp_path / "predictions_sliding_window_b16_L100.csv"),
                     pd.read_csv(tmp_path / "predictions_full_all_L100.csv"))
    assert df.loc["sliding_window", "vs_full_diff"] == paired.diff
    assert df.loc["sliding_window", "vs_full_p"] == paired.p_value
    assert df.loc["full", "beyond_trained"] > 0 and df.loc["sliding_window", "beyond_trained"] == 0  # 50 frames
    assert "vs_full" in (tmp_path / "results.md").read_text()


def test_nano_benchmark_pools_seeds_and_shards_give_the_same_table(tmp_path):
    """Several held-out seeds pool into one row per cell (intervals over every question, the per-seed range
    beside it); the same points run as two shards and rendered afterwards give the same table."""
    nb = _nano_benchmark()
    args = ["--preset", "quick", "--videos", "1", "--lengths", "40", "--methods", "full", "uniform", "--seeds", "21", "22"]
    whole = nb.main([*args, "--out", str(tmp_path / "whole")]).set_index("method")
    assert (whole.questions == 10).all() and (whole.seeds == "21 22").all()
    by_seed = pd.read_csv(tmp_path / "whole" / "results_by_seed.csv")
    assert len(by_seed) == 4 and set(by_seed.seed) == {21, 22}
    for method, g in by_seed.groupby("method"):
        assert whole.loc[method, "seed_lo"] == g.accuracy.min() and whole.loc[method, "seed_hi"] == g.accuracy.max()
        assert whole.loc[method, "accuracy"] == pytest.approx((g.accuracy * g.questions).sum() / g.questions.sum())
    # one seed of the folder, rendered alone: that seed's rows, into its own files (the pooled table stays)
    one = nb.main([*args[:-2], "22", "--render-only", "--out", str(tmp_path / "whole")]).set_index("method")
    seed22 = by_seed[by_seed.seed == 22].set_index("method")
    assert (one.questions == 5).all() and (one.accuracy == seed22.accuracy.loc[one.index]).all()
    assert (tmp_path / "whole" / "results_s22.md").is_file()
    assert pd.read_csv(tmp_path / "whole" / "results.csv").seeds.astype(str).eq("21 22").all()
    for i in (0, 1):
        assert nb.main([*args, "--shard", f"{i}/2", "--out", str(tmp_path / "sharded")]).empty
    sharded = nb.main([*args, "--render-only", "--out", str(tmp_path / "sharded")]).set_index("method")
    cols = ["questions", "accuracy", "memory", "recency", "cross_frame", "vs_full_diff", "online_tokens", "seed_lo"]
    pd.testing.assert_frame_equal(whole[cols], sharded[cols])
    with pytest.raises(SystemExit, match="not run yet"):
        nb.main([*args, "--render-only", "--out", str(tmp_path / "empty")])


def test_nano_benchmark_table_preset_is_the_evidence_protocol(tmp_path):
    """The table (issue #31's protocol): every method with a budget answers from at most the same 256 video
    tokens (budget_tokens through each method's video_tokens), the position-bounded full cache beside the full
    one, three held-out seeds by default (here one, on a short stream, to stay cheap), detail split by the age
    of its needle in each method's window."""
    nb = _nano_benchmark()
    table = nb.PRESETS["table"]
    assert table["seeds"] and len(table["seeds"]) >= 3 and table["budget_unit"] == "tokens"
    assert table["videos"] * 5 * len(table["seeds"]) / 5 >= 200  # questions per type per cell
    # seed 3: two detail needles, 18 s and 50 s old (in the window of 31-32 s, and 1-4 windows back)
    # every method of the registry by default, and the bounded full cache (here the budget mappings of a few,
    # to stay cheap: the quick preset runs every method)
    assert "methods" not in table and table["extra_methods"] == ["full_bounded"]
    methods = ["full", "sliding_window", "uniform", "rekv", "mukv", "infinipot_v", "full_bounded"]
    df = nb.main(["--preset", "table", "--videos", "2", "--lengths", "96", "--seeds", "3", "--methods", *methods,
                  "--out", str(tmp_path)]).set_index("method")
    assert list(df.index) == methods and (df.budget_unit == "tokens").all()
    assert pd.isna(df.loc["full_bounded", "vs_full_bounded_diff"]) and df.drop("full_bounded").vs_full_bounded_p.notna().all()
    md = (tmp_path / "results.md").read_text()
    assert "| vs_full | vs_full_bounded |" in md and "| detail_by_window_age | recall_by_window_age |" in md
    budgeted = df[df.budget != "all"]
    # the window: the budget's video tokens as frames of 16 tokens at 0.5 fps (256 tokens: 32 s); none without one
    assert (budgeted.window_s == budgeted.budget_video_tokens / 16 / 0.5).all()
    # the full caches are broken down by the widest window of the budgeted rows (a reference for theirs)
    assert (df.loc[["full", "full_bounded"], "window_s"] == budgeted.window_s.max()).all()
    assert (budgeted["detail_1-4_windows_n"] == 1).all() and (budgeted.detail_in_window_n == 1).all()
    window = df.loc["sliding_window"]  # it holds the needle inside its window and not the older one
    assert (window.recall_in_window, window["recall_1-4_windows"]) == (1.0, 0.0)
    assert (budgeted.budget_video_tokens <= 256).all() and (budgeted.budget_video_tokens >= 256 - 16).all()
    from mukv.models.loading import load_video_llm

    init = len(load_video_llm("nano", None, device="cpu", dtype="float32").init_prompt_ids())
    for method in budgeted.index:  # every answer: the init prompt and at most 256 video tokens
        rows = pd.read_csv(tmp_path / f"predictions_{method}_t256_L96.csv")
        assert (rows.online_tokens <= init + 256).all(), method


def test_nano_benchmark_quant_preset_shrinks_the_store(tmp_path):
    """The quantized store on the nano model (head dim 24: groups of 8, not the default 64)."""
    df = _nano_benchmark().main(["--preset", "quant", "--videos", "1", "--lengths", "40", "--out", str(tmp_path)])
    assert len(df) == 6
    for method, g in df.groupby("method"):
        kv = g.set_index("kv_quant").kv_mib
        assert kv["int4"] < kv["int8"] < kv["none"], (method, kv)
        assert all(json.loads(k).get("kv_quant_group_size", 8) == 8 for k in g.knobs)


def test_nano_benchmark_each_type_preset_asks_one_type_per_stream(tmp_path):
    """The count-only (and motion-only, ...) streams of BENCHMARKS.md section 1: one row per type, scored on
    that type alone."""
    from mukv.data.synthetic import QUESTION_TYPES

    df = _nano_benchmark().main(["--preset", "each_type", "--videos", "1", "--lengths", "20", "--out", str(tmp_path)])
    assert list(df.streams) == list(QUESTION_TYPES) and (df.questions == 5).all() and set(df.method) == {"full"}
    for _, row in df.iterrows():  # a stream asks count where its type cannot be asked (no needle left)
        assert row.streams in {t for t in QUESTION_TYPES if not pd.isna(row[t])} <= {row.streams, "count"}
    preds = pd.read_csv(tmp_path / "predictions_full_all_L20_count.csv")
    assert set(preds.qtype) == {"count"}


def test_nano_benchmark_takes_hydra_overrides(tmp_path):
    """One override syntax: a method with its own overrides is one word ("rekv cache.scoring=cosine"), overrides
    after the options apply to every run; the preset's ReKV window and the budget still apply, and a user
    override of the same key wins. Unknown options and keys fail before anything runs, in one line."""
    nb = _nano_benchmark()
    df = nb.main(["--preset", "quick", "--videos", "1", "--lengths", "20", "--out", str(tmp_path), "--methods",
                  "rekv cache.scoring=cosine", "rekv_shared", "--", "cache.n_local=64", "engine.max_new_tokens=2"])
    assert list(df.method) == ["rekv cache.scoring=cosine", "rekv_shared"] and list(df.budget) == [16, 16]
    for folder in ("rekv+scoring=cosine_b16_L20", "rekv_shared_b16_L20"):
        cfg = yaml.safe_load((tmp_path / "runs" / folder / "resolved_config.yaml").read_text())
        assert cfg["cache"]["n_local"] == 64 and cfg["cache"]["retrieve_size"] == 16 and cfg["engine"]["max_new_tokens"] == 2
    assert cfg["cache"]["per_layer"] is False and json.loads(df.knobs.iloc[0])["scoring"] == "cosine"
    with pytest.raises(SystemExit):
        nb.main(["--methods", "nope", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="cache.nope"):
        nb.main(["--methods", "full", "--videos", "1", "--lengths", "20", "--out", str(tmp_path / "y"), "--",
                 "cache.nope=1"])


def test_nano_current_pilot_runs_every_option():
    """`experiments/nano_current_pilot.py` (BENCHMARKS.md section 1): the cell-word tokenizer grafted onto the
    shipped checkpoint, the asked-cell probe, mean-head supervision and the oracle, two steps each, as a script."""
    out = subprocess.run([sys.executable, "experiments/nano_current_pilot.py", "--steps", "2", "--heldout", "2",
                          "--cell-words", "--parse-weight", "1", "--attend-weight", "1", "--attend-head", "mean",
                          "--oracle-layer", "3", "--threads", "1"], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    final = json.loads(out.stdout.strip().splitlines()[-1])
    held = final["heldout"]
    assert 0 <= held["acc"] <= 1 and 0 <= held["parse_acc"] <= 1 and len(held["mass"]) == 1
    assert 2 <= sum(held["answers"].values()) <= 2 * 4  # two held-out streams, up to four distinct questions each


def test_nano_head_map_finds_the_supervised_encoding_patterns():
    """`experiments/nano_head_map.py` (BENCHMARKS.md section 1): a layer x head map of the attention from ball
    tokens to the previous ball and from needle tokens to earlier needles. In the shipped checkpoint both are
    supervised in layers 0-1, so some head there carries each (attention spread evenly over a prefix of 100+
    tokens would give under 0.01), and every entry is an attention mass; the printed tables are the map."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nano_head_map", ROOT / "experiments" / "nano_head_map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    maps = module.head_map(str(ROOT / "mukv" / "assets" / "nano"), streams=4, frames=16)
    assert set(maps) == {"ball -> previous ball", "needle -> earlier needles"}
    for mass in maps.values():
        assert mass.shape == (4, 8) and ((mass >= 0) & (mass <= 1)).all()  # layers x heads
    assert maps["ball -> previous ball"][:2].max() > 0.5
    assert maps["needle -> earlier needles"][:2].max() > 0.2
    out = subprocess.run([sys.executable, "experiments/nano_head_map.py", "--streams", "2", "--frames", "12"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("| layer | " + " | ".join(f"head {h}" for h in range(8)) + " |") == 2


def test_nano_benchmark_budgets_in_tokens(tmp_path):
    """`--budget-unit tokens`: every method answers from at most the budget's video tokens (budget_tokens=, the
    method's video_tokens), shown beside the measured online tokens; the presets' budgets stay frames."""
    nb = _nano_benchmark()
    df = nb.main(["--preset", "quick", "--videos", "1", "--lengths", "40", "--out", str(tmp_path), "--budget-unit",
                  "tokens", "--budgets", "100", "--methods", "full", "uniform", "mukv", "--", "engine.max_new_tokens=1"])
    by = df.set_index("method")
    assert list(df.budget) == ["all", 100, 100] and set(df.budget_unit) == {"tokens"}
    assert pd.isna(by.loc["full", "budget_video_tokens"])
    assert by.loc["uniform", "budget_video_tokens"] == 96 and by.loc["mukv", "budget_video_tokens"] == 63
    assert (by.loc[["uniform", "mukv"], "online_tokens"] <= 100 + 11).all()  # the init prompt's 11 tokens aside
    metrics = json.loads((tmp_path / "runs" / "mukv_t100_L40" / "metrics.json").read_text())
    assert metrics["budget_tokens"] == 100 and metrics["budget_frames"] is None
    assert metrics["budget_knobs"] == {"top_k": [2, 4, 1]} and metrics["budget_video_tokens"] == 63
    assert "| 100 | 96 |" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):  # a preset's budgets are frames: tokens need their own --budgets
        nb.main(["--budget-unit", "tokens", "--out", str(tmp_path / "x")])
