"""Run a grid of configurations as ONE Hydra multirun and render its results table and figures.

    python experiments/reproduce_table.py                 # the synthetic grid (make reproduce-table)
    python experiments/reproduce_table.py --data rvs      # the paper's RVS table (make reproduce-table DATA=rvs)
    python experiments/reproduce_table.py --data ovo      # OVO-Bench, judge-free (make reproduce-table DATA=ovo)
    python experiments/reproduce_table.py --grid my.yaml --out DIR [hydra overrides for every run ...]

A grid file (``experiments/grids/*.yaml``) names an experiment preset, a model, datasets, the cache methods
(``methods: all``: the registry, ``mukv.cache.ordered_methods``, so a new method joins the table by existing;
or a list) and an optional ``budget_frames`` list: each method runs once at its config's defaults (the
"main" point) and, if it has a budget (``CacheMethod.budget_knobs``), once per budget in frames
(``budget_frames=``, mapped onto the method's own knobs). Each point becomes a generated config
``experiment/grid/<point>.yaml`` (under ``<out>/grid_conf``, added to Hydra's search
path), and the whole grid runs as one ``python -m mukv.run -m dataset=... +experiment/grid=...`` multirun
whose job folders land in ``<out>/runs/``. Then ``results.csv``, ``results.md`` and the figures
(``accuracy_vs_online_tokens.png``, ``accuracy_vs_question_age.png``, ``memory_latency_vs_length.png``)
are written to ``<out>`` (default ``outputs/reproduce/<time>_<grid>/``). A dataset scored per question type and
category (``Dataset.macro_average``: OVO-Bench) gets a table by type in ``results.md`` (``results_by_type.csv``)
with the grid's ``references`` beside the runs: published results stored as counts per type
(``references: [{dataset, label, correct_total: {type: [correct, total]}}]``), scored by the same averaging.

Before anything runs, every input the grid needs is checked: annotation files, video files, model weights
(a local folder or the Hugging Face cache), the judge's API key, cache methods not implemented yet. If
something is missing the script lists exactly what, and exits with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GRIDS = Path(__file__).resolve().parent / "grids"


@dataclass
class Point:
    """One grid point: a cache method, and its budget in frames (None: the config's own knobs)."""

    name: str
    method: str
    role: str  # main | budget
    budget_frames: int | None = None

    def config(self) -> str:
        """The ``# @package _global_`` YAML that selects the method and sets the budget."""
        body: dict[str, Any] = {"defaults": [{"override /cache": self.method}], "tags": [f"grid:{self.role}"]}
        if self.budget_frames is not None:
            body["budget_frames"] = self.budget_frames
        return "# @package _global_\n" + yaml.safe_dump(body, sort_keys=False)


class GridError(Exception):
    """What the grid needs and does not have (message meant to be read as is)."""


def load_grid(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise GridError(f"grid file not found: {path}")
    grid = yaml.safe_load(path.read_text()) or {}
    for key in ("experiment", "datasets", "methods"):
        if key not in grid:
            raise GridError(f"{path}: missing key '{key}'")
    if grid["methods"] != "all" and not isinstance(grid["methods"], list):
        raise GridError(f"{path}: methods must be 'all' (the registry) or a list of cache methods")
    budgets = grid.setdefault("budget_frames", [])
    if not isinstance(budgets, list) or not all(isinstance(b, int) and b > 0 for b in budgets):
        raise GridError(f"{path}: budget_frames must be a list of positive frame counts, got {budgets!r}")
    grid.setdefault("name", path.stem)
    grid.setdefault("title", grid["name"])
    grid["references"] = _references(path, grid)
    return grid


def _references(path: Path, grid: dict[str, Any]) -> list[Any]:
    """The grid's reference rows (``mukv.report.tables.Reference``), checked."""
    from mukv.report.tables import Reference

    refs = grid.get("references") or []
    if not isinstance(refs, list):
        raise GridError(f"{path}: references must be a list of {{dataset, label, correct_total}}")
    out = []
    for i, ref in enumerate(refs):
        where = f"{path}: references[{i}]"
        if not isinstance(ref, dict) or not {"dataset", "label", "correct_total"} <= set(ref):
            raise GridError(f"{where} needs dataset, label and correct_total")
        if ref["dataset"] not in grid["datasets"]:
            raise GridError(f"{where}: dataset {ref['dataset']!r} is not one of the grid's datasets {grid['datasets']}")
        counts = ref["correct_total"]
        if not isinstance(counts, dict) or not counts:
            raise GridError(f"{where}: correct_total must map question types to [correct, total]")
        for qtype, pair in counts.items():
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) and v >= 0 for v in pair)
                    and 0 < pair[1] and pair[0] <= pair[1]):
                raise GridError(f"{where}: correct_total.{qtype} must be [correct, total] with 0 <= correct <= total "
                                f"and total > 0, got {pair!r}")
        out.append(Reference(str(ref["dataset"]), str(ref["label"]), {str(t): (c, n) for t, (c, n) in counts.items()}))
    return out


def dataset_breakdowns(grid: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """dataset name -> its categories of question types, for every grid dataset scored per type and category
    (``Dataset.macro_average``) or with a reference row."""
    from hydra import compose, initialize_config_dir

    from mukv.config import register_configs
    from mukv.data.datasets import dataset_class

    register_configs()
    referenced = {ref.dataset for ref in grid.get("references") or []}
    out = {}
    for dataset in grid["datasets"]:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("eval", overrides=[f"dataset={dataset}"])
        cls = dataset_class(cfg.dataset)
        if cls.categories and (cls.macro_average or dataset in referenced):
            out[str(cfg.dataset.name)] = {c: list(types) for c, types in cls.categories.items()}
    return out


def available_methods() -> list[str]:
    """Cache methods that are implemented (registered) and have a config file, in display order."""
    from mukv.cache import ordered_methods

    return ordered_methods()


def grid_methods(grid: dict[str, Any]) -> list[str]:
    """The methods a grid asks for: ``all`` is every registered method (one without a config file is then
    reported as not implemented here)."""
    from mukv.cache import ordered_methods

    return ordered_methods(with_config=False) if grid["methods"] == "all" else [str(m) for m in grid["methods"]]


def grid_points(grid: dict[str, Any], methods: list[str]) -> list[Point]:
    """Per method its main point, then (methods with a budget) one point per ``budget_frames``."""
    from mukv.cache import budget_knobs

    points: list[Point] = []
    for method in methods:
        points.append(Point(f"p{len(points):02d}_{method}_main", method, "main"))
        for frames in grid["budget_frames"] if budget_knobs(method, 1, 1) else []:
            points.append(Point(f"p{len(points):02d}_{method}_b{frames}", method, "budget", frames))
    return points


# ------------------------------------------------------------------------------------------ preflight
def weights_problem(model_cfg) -> str | None:
    """Why the model's weights cannot be loaded without a download, or None."""
    from mukv.models.loading import model_loader

    if model_loader(model_cfg).kind != "pretrained":
        return None
    path = str(model_cfg.path)
    local = Path(path).expanduser()
    if local.exists() or path.startswith(("/", ".", "~")):
        if not (local / "config.json").is_file():
            return f"model weights: {local} has no config.json (model.path must be a transformers model folder)"
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    found = try_to_load_from_cache(path, "config.json")
    snapshot = Path(found).parent if isinstance(found, str) else None
    if snapshot is None or not (any(snapshot.glob("*.safetensors")) or any(snapshot.glob("*.bin"))):
        return (f"model weights: {path} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}); download "
                f"it with `hf download {path}` (or set HF_HOME, or model.path=/local/folder, or pass "
                "--allow-download)")
    return None


def preflight(grid: dict[str, Any], model: str | None, overrides: list[str], allow_download: bool) -> list[str]:
    """Everything the grid needs and does not have, one line each (empty when all is there)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from mukv.config import register_configs
    from mukv.data.datasets import dataset_class
    from mukv.errors import MukvError
    from mukv.judge import validate_judge_config
    from mukv.models.loading import model_loader
    from mukv.train_eval import build_dataset, validate_config

    register_configs()
    problems: list[str] = []
    checked_model = False
    for dataset in grid["datasets"]:
        try:
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose("eval", overrides=[f"experiment={grid['experiment']}", *_model(model),
                                                   f"dataset={dataset}", *overrides])
        except HydraException as err:
            problems.append(f"config ({dataset}): {err}")
            continue
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(ROOT / "outputs" / ".preflight")
        ds = cfg.dataset
        has_files = dataset_class(ds).has_files  # annotation and video files (RVS)
        if has_files and ds.annotation and not Path(ds.annotation).is_file():
            problems.append(f"{dataset}: annotation file not found: {ds.annotation} (see data/README.md; or "
                            f"dataset.annotation=/path, paths.data_dir=/path)")
        elif has_files:
            try:
                build_dataset(cfg)  # validates every record and checks that every video file exists
            except MukvError as err:
                problems.append(f"{dataset}: {err}")
        try:
            validate_judge_config(cfg.judge)
        except MukvError as err:
            if f"judge: {err}" not in problems:
                problems.append(f"judge: {err}")
        if not checked_model:
            checked_model = True
            m = cfg.model
            if model_loader(m).kind == "pretrained":
                problem = None if allow_download else weights_problem(m)
                if problem:
                    problems.append(problem)
            else:
                try:
                    model_loader(m).geometry(m)
                except MukvError as err:
                    problems.append(f"model {m.name}: {err}" + ("" if model else " (or pass --model tiny)"))
        if not problems:
            try:
                validate_config(cfg)
            except MukvError as err:
                problems.append(f"{dataset}: {err}")
    return problems


# ------------------------------------------------------------------------------------------------ run
def _model(model: str | None) -> list[str]:
    """The model override; none for the config's default (the embedded model)."""
    return [f"model={model}"] if model else []


def run_grid(grid: dict[str, Any], points: list[Point], model: str | None, out: Path, overrides: list[str]) -> int:
    conf_dir = out / "grid_conf"
    (conf_dir / "experiment" / "grid").mkdir(parents=True, exist_ok=True)
    for p in points:
        (conf_dir / "experiment" / "grid" / f"{p.name}.yaml").write_text(p.config())
    cmd = [sys.executable, "-m", "mukv.run", "-m", f"experiment={grid['experiment']}", *_model(model),
           f"dataset={','.join(grid['datasets'])}", f"+experiment/grid={','.join(p.name for p in points)}",
           f"hydra.searchpath=[file://{conf_dir.resolve()}]", f"hydra.sweep.dir={(out / 'runs').resolve()}",
           "hydra.sweep.subdir=${hydra.job.num}", *overrides]
    (out / "command.txt").write_text(" ".join(cmd) + "\n")
    print(f"running {len(points) * len(grid['datasets'])} job(s) as one Hydra multirun -> {out / 'runs'}",
          flush=True)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    with (out / "multirun.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if "[HYDRA]" in line or line.startswith("error"):
                print(line.rstrip(), flush=True)
        return proc.wait()


def render(out: Path, grid: dict[str, Any]) -> tuple[Any, list[Path]]:
    from mukv.report.figures import grid_figures
    from mukv.report.tables import collect_runs, write_tables

    runs = collect_runs([out / "runs"]) if (out / "runs").is_dir() else []
    df = write_tables(runs, out, title=str(grid["title"]), notes=list(grid.get("notes") or []),
                      breakdowns=dataset_breakdowns(grid), references=grid.get("references") or [])
    return df, grid_figures(runs, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", default="synthetic", help="which grid: experiments/grids/<data>.yaml")
    parser.add_argument("--grid", type=Path, help="a grid file (instead of --data)")
    parser.add_argument("--out", type=Path, help="output folder (default outputs/reproduce/<time>_<grid>)")
    parser.add_argument("--model", help="conf/model option (default: the grid's, else the config's default)")
    parser.add_argument("--methods", help="comma-separated cache methods (default: the grid's; 'all' is the registry)")
    parser.add_argument("--check", action="store_true", help="only check that the inputs are there")
    parser.add_argument("--allow-download", action="store_true", help="let missing Hub weights download")
    parser.add_argument("--render-only", action="store_true", help="only re-render the tables and figures of --out")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid or GRIDS / f"{args.data}.yaml")
    except GridError as err:
        known = ", ".join(sorted(p.stem for p in GRIDS.glob("*.yaml")))
        print(f"error: {err} (grids: {known})", file=sys.stderr)
        return 2
    if args.render_only:
        if not args.out or not (args.out / "runs").is_dir():
            print("error: --render-only needs --out DIR with a runs/ folder", file=sys.stderr)
            return 2
        df, figures = render(args.out, grid)
        print((args.out / "results.md").read_text())
        return 0
    model = args.model or grid.get("model")  # None: the config's default model
    if args.methods:
        grid["methods"] = "all" if args.methods == "all" else args.methods.split(",")
    wanted = grid_methods(grid)
    have = available_methods()
    missing_methods = [m for m in wanted if m not in have]
    methods = [m for m in wanted if m in have]
    problems: list[str] = []
    if missing_methods and (grid.get("require_all_methods") or args.methods):
        problems += [f"cache method '{m}' is not implemented here (no registered class or conf/cache/{m}.yaml); "
                     f"implemented: {', '.join(have)}" for m in missing_methods]
    elif missing_methods:
        print(f"note: skipping cache methods not implemented yet: {', '.join(missing_methods)}", file=sys.stderr)
    problems += preflight(grid, model, list(args.overrides), args.allow_download)
    if problems:
        print(f"error: cannot reproduce '{grid['title']}'; missing:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    if args.check:
        print(f"all inputs of '{grid['title']}' are present")
        return 0
    points = grid_points(grid, methods)
    out = args.out or ROOT / "outputs" / "reproduce" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{grid['name']}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rc = run_grid(grid, points, model, out, list(args.overrides))
    df, figures = render(out, grid)
    expected = len(points) * len(grid["datasets"])
    print((out / "results.md").read_text())
    print(f"{len(df)} of {expected} run(s) finished in {time.time() - started:.0f} s")
    print(f"table: {out / 'results.md'}, {out / 'results.csv'}")
    print("figures: " + ", ".join(str(f) for f in figures))
    if rc != 0 or len(df) < expected:
        print(f"error: the multirun exited with status {rc} and {expected - len(df)} run(s) did not finish; "
              f"see {out / 'multirun.log'} and the run folders' run.log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
