"""The CLI the way a user meets it (``python -m mukv.run`` as a subprocess): the README's multirun commands
verbatim, the table a multirun ends with, ``--cfg job --resolve``, ``--help``, and composition errors
(one ``error:`` line, exit status 2)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TIME_DIR = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d")


def cli(*args: str, cwd: Path = ROOT, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MUKV_OUTPUTS", "MUKV_DRY_RUN")}
    env.update({"WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **extra_env})
    return subprocess.run([sys.executable, "-m", "mukv.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def readme_multirun_commands() -> list[list[str]]:
    """Every ``python -m mukv.run -m ...`` line of README.md's code blocks, as arguments after ``mukv.run``
    (comments dropped; a literal ``...`` stands for "more overrides" and is dropped too)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            if line.strip().startswith("python -m mukv.run -m "):
                args = [a for a in shlex.split(line, comments=True) if a != "..."]
                commands.append(args[3:])
    return commands


README_MULTIRUNS = readme_multirun_commands()
CHEAP = [c for c in README_MULTIRUNS if "experiment=smoke" in c]
EXPENSIVE = [c for c in README_MULTIRUNS if "experiment=smoke" not in c]


def sweep_folder(outputs: Path) -> Path:
    """The one multirun folder under an outputs root: <outputs>/<task_name>/multiruns/<time>/."""
    (sweep,) = outputs.glob("*/multiruns/*")
    assert TIME_DIR.fullmatch(sweep.name), sweep
    return sweep


def test_the_readme_has_multirun_examples_of_both_kinds():
    assert len(README_MULTIRUNS) >= 4 and CHEAP and EXPENSIVE, README_MULTIRUNS


@pytest.mark.parametrize("args", EXPENSIVE, ids=lambda a: " ".join(a)[:60])
def test_readme_multirun_resolves_its_sweep_folder_and_every_job(args, tmp_path):
    """Expensive README sweeps (real weights, RVS data, a judge API) run verbatim in dry mode: Hydra resolves
    hydra.sweep.dir and composes every job; each job prints its folder instead of loading a model."""
    proc = cli(*args, MUKV_OUTPUTS=str(tmp_path), MUKV_DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    launched = int(re.search(r"Launching (\d+) jobs", proc.stdout + proc.stderr).group(1))
    jobs = re.findall(r"dry run \(MUKV_DRY_RUN=1\): job (\d+) -> (\S+):", proc.stdout)
    assert launched >= 2 and len(jobs) == launched
    asked = next((a.split("=", 1)[1].split(",") for a in args if a.startswith("cache=")), None)
    if asked:  # "command line narrows a preset": only the methods the command names run
        ran = re.findall(r"dry run .*: .*\bcache=(\w+)", proc.stdout)
        assert len(ran) == launched and set(ran) == set(asked), ran
    sweep = sweep_folder(tmp_path)
    assert [Path(folder) for _, folder in jobs] == [sweep / num for num, _ in jobs]
    for num, _ in jobs:  # nothing ran: Hydra's own files only
        assert {p.name for p in (sweep / num).iterdir()} == {".hydra", "run.log"}
    assert (sweep / "results.md").is_file() and f"0 of {launched} job(s) finished" in proc.stdout


def test_multirun_outputs_default_to_outputs_in_the_folder_it_runs_in(tmp_path):
    proc = cli("-m", "cache=full,uniform", "experiment=smoke", cwd=tmp_path, MUKV_DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = sweep_folder(tmp_path / "outputs")
    assert sweep.parent.parent.name == "smoke" and {p.name for p in sweep.iterdir() if p.is_dir()} == {"0", "1"}


@pytest.fixture(scope="module")
def readme_smoke_multirun(tmp_path_factory):
    """The README's cheap multirun, verbatim, for real (nano model, smoke-sized synthetic stream)."""
    (args,) = CHEAP
    out = tmp_path_factory.mktemp("outputs")
    proc = cli(*args, MUKV_OUTPUTS=str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return args, proc, sweep_folder(out)


def test_readme_smoke_multirun_runs_end_to_end(readme_smoke_multirun):
    args, proc, sweep = readme_smoke_multirun
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert (job / "metrics.json").is_file() and (job / "predictions.csv").is_file(), job
    assert sweep.parent.parent.name == "smoke"  # outputs/<task_name>/multiruns/<time>/<n>/


def test_multirun_ends_with_one_table_of_its_jobs(readme_smoke_multirun):
    _, proc, sweep = readme_smoke_multirun
    table = pd.read_csv(sweep / "results.csv")
    assert len(table) == 4 and sorted(set(table.method)) == ["full", "sliding_window"]
    assert sorted(Path(d).name for d in table.run_dir) == ["0", "1", "2", "3"]
    # Jobs that differ only by a non-cache override get their own label.
    assert sorted(table.setting) == ["engine.max_new_tokens=2"] * 2 + ["engine.max_new_tokens=3"] * 2
    markdown = (sweep / "results.md").read_text()
    assert "4 of 4 job(s) finished" in markdown and "| sliding_window | engine.max_new_tokens=3 |" in markdown
    assert markdown.strip() in proc.stdout and str(sweep / "results.md") in proc.stdout


def test_cfg_job_resolve_prints_the_resolved_config_and_the_run_folder(tmp_path):
    args = ("cache=sliding_window", "cache.n_local=123")
    proc = cli("--cfg", "job", "--resolve", *args, MUKV_OUTPUTS=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    assert "${" not in proc.stdout and cfg["cache"]["n_local"] == 123
    assert cfg["paths"]["root_dir"] == str(ROOT) and cfg["paths"]["data_dir"] == str(ROOT / "data")
    # paths.output_dir is the folder the same command then runs in.
    run = cli(*args, MUKV_OUTPUTS=str(tmp_path), MUKV_DRY_RUN="1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"run -> {cfg['paths']['output_dir']}:" in run.stdout
    assert Path(cfg["paths"]["output_dir"]).parent == tmp_path / "eval" / "runs"


def test_help_lists_options_without_the_schemas():
    proc = cli("--help")
    assert proc.returncode == 0, proc.stderr
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "cache: expected_attention, full, full_bounded, hermes, infinipot_v, knorm, mukv," in groups and "model: llava_ov_0.5b" in groups and "_schema" not in groups


# ------------------------------------------------------------------------------ composition errors: exit 2
COMPOSE_ERRORS = {  # the typo and its `+` twin: test_appended_key_gives_the_same_line_as_the_typo
    "++dataset.synthetic.typo=1": "unknown config key 'dataset.synthetic.typo' (dataset.synthetic keys: num_videos,",
    "cache=foo": "unknown option 'foo' for cache (options: expected_attention, full, full_bounded, hermes, infinipot_v, knorm, mukv,",
    "dataset.sample_fps=abc": "config field 'dataset.sample_fps': Value 'abc'",
    "model.device=[1": "cannot parse override 'model.device=[1'",
    "cache=mukv_schema": "cache=mukv_schema is the schema that cache configs extend, not an option (options: expected_attention, full,",
}


@pytest.mark.parametrize("override", list(COMPOSE_ERRORS))
def test_compose_error_is_one_line_and_exit_2(override, tmp_path):
    proc = cli(f"hydra.run.dir={tmp_path}/r", override)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: " + COMPOSE_ERRORS[override]), proc.stderr
    assert "_schema," not in lines[0] and "error" not in proc.stdout.lower()
    assert not (tmp_path / "r" / "predictions.csv").exists()
    log = tmp_path / "r" / "run.log"
    assert not log.exists() or "loading model" not in log.read_text()


def test_appended_key_gives_the_same_line_as_the_typo(tmp_path):
    typo = cli(f"hydra.run.dir={tmp_path}/a", "cache=rekv", "cache.n_locl=5")
    added = cli(f"hydra.run.dir={tmp_path}/b", "cache=rekv", "+cache.n_locl=5")
    assert typo.returncode == added.returncode == 2
    assert typo.stderr == added.stderr and "rekv" not in typo.stderr.split("(")[0]
    assert typo.stderr.startswith("error: unknown config key 'cache.n_locl' (cache keys: ")
    assert " n_local, " in typo.stderr and len(typo.stderr.splitlines()) == 1 and "Traceback" not in added.stderr


def test_compose_error_in_a_multirun_is_one_line_and_exit_2(tmp_path):
    proc = cli("-m", "cache.n_locl=1,2", "experiment=smoke", MUKV_OUTPUTS=str(tmp_path))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: unknown config key 'cache.n_locl' (cache keys: ")


def test_a_config_error_is_printed_once_and_kept_in_run_log(tmp_path):
    proc = cli(f"hydra.run.dir={tmp_path}/r", "dataset.sample_fps=-1")
    message = "config field 'dataset.sample_fps': must be a positive number"
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).count(message) == 1 and proc.stderr.startswith(f"error: {message}")
    assert message in (tmp_path / "r" / "run.log").read_text()


def test_no_shipped_config_has_a_key_its_schema_lacks():
    """The check that refuses ``+cache.n_locl=5`` after composition passes every shipped option and preset."""
    from hydra import compose, initialize_config_dir

    from mukv.run import check_composed

    conf = ROOT / "conf"
    overrides = []
    for group in ("model", "dataset", "cache", "judge", "logger", "engine", "experiment"):
        for path in sorted((conf / group).rglob("*.yaml")):
            option = path.relative_to(conf / group).with_suffix("").as_posix()
            if option.startswith("mukv_mix/"):  # used on top of cache=mukv, as sweep/granularity_mix_mukv does
                overrides.append(["cache=mukv", f"+experiment/mukv_mix={path.stem}"])
            else:
                overrides.append([f"{group}={option}"])
    assert ["experiment=sweep/video_length"] in overrides and ["cache=mukv", "+experiment/mukv_mix=f"] in overrides
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for override in overrides:
            check_composed(compose("eval", overrides=override))
        with pytest.raises(Exception, match=r"^unknown config key 'cache.n_locl' \(cache keys: "):
            check_composed(compose("eval", overrides=["+cache.n_locl=5"]))
