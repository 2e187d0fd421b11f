"""Sweeps: the Hydra presets in ``conf/experiment/sweep/`` are the only grids; W&B specs are made from them.

    python -m mukv.sweeps wandb experiment=sweep/budget cache=rekv model=llava_ov_0.5b dataset=rvs_ego judge=openai
    python -m mukv.sweeps wandb experiment=smoke model=tiny cache=full,sliding_window engine.max_new_tokens=2,4
    python -m mukv.sweeps methods [budget]

``wandb`` takes exactly the arguments of ``python -m mukv.run -m`` and prints (or writes, ``--out``) the W&B
sweep spec that runs the same grid: the preset's ``hydra.sweeper.params`` plus the command line's sweeps
(a command-line value replaces the preset's for the same key, as Hydra's basic sweeper does) become
``parameters``; every other override is fixed in ``command``, which runs ``python -m mukv.run`` once per
point (``logger=wandb logger.mode=online``). So a grid is written once, and a spec is never a hand-kept copy.

``method_list`` is the ``${mukv_methods:}`` resolver (registered by ``mukv.config.register_configs``): the
presets name the registry instead of listing methods, so a new cache method joins every sweep by existing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

CONF = Path(__file__).resolve().parents[1] / "conf"
SPEC_COMMAND_HEAD = ["${env}", "${interpreter}", "-m", "mukv.run"]
SPEC_COMMAND_TAIL = ["logger=wandb", "logger.mode=online", "${args_no_hyphens}"]


def method_list(kind: str = "") -> str:
    """``${mukv_methods:}``: every cache method a run can select, comma-separated in display order (a Hydra
    sweep); ``${mukv_methods:budget}``: only those with a budget (``CacheMethod.budget_knobs`` not empty), the
    methods a ``budget_frames`` sweep changes."""
    from mukv.cache import budget_knobs, ordered_methods

    names = ordered_methods()
    if kind == "budget":
        names = [n for n in names if budget_knobs(n, 1, 1)]
    elif kind:
        raise ValueError(f"mukv_methods: unknown selection '{kind}'; use ${{mukv_methods:}} or ${{mukv_methods:budget}}")
    return ",".join(names)


def _parse(lines: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(lines)


def _values(override: Any) -> list[Any]:
    """The points of one sweep override, as plain values for a W&B grid."""
    if not override.is_sweep_override():
        return [override.value()]
    if not override.is_discrete_sweep():
        raise SystemExit(f"error: {override.input_line}: a W&B grid needs a discrete sweep (a,b,c / choice / range)")
    return [v if not isinstance(v, tuple) else list(v) for v in override.sweep_iterator()]


def sweep_grid(args: list[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """(fixed overrides, {key: values}) of ``python -m mukv.run -m <args>``: the preset's sweeper params,
    then the command line's overrides, the later replacing the earlier for the same key."""
    from hydra import compose, initialize_config_dir

    from mukv.config import register_configs

    register_configs()
    overrides = _parse(args)
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=[o.input_line for o in overrides if not o.is_sweep_override()],
                      return_hydra_config=True)
    params = cfg.hydra.sweeper.params or {}
    grid: dict[str, list[Any]] = {}
    for o in _parse([f"{k}={v}" for k, v in params.items()]) + overrides:  # as BasicSweeper: later keys win
        if o.is_sweep_override():
            grid[o.get_key_element()] = _values(o)
        else:
            grid.pop(o.get_key_element(), None)
    return fixed, grid


def wandb_spec(args: list[str], name: str | None = None) -> dict[str, Any]:
    """The W&B sweep spec (grid search over ``accuracy``) of ``python -m mukv.run -m <args>``."""
    fixed, grid = sweep_grid(args)
    if not grid:
        raise SystemExit("error: nothing to sweep: name a preset (experiment=sweep/...) or a sweep (key=a,b)")
    preset = next((a.split("=", 1)[1] for a in fixed if a.startswith("experiment=")), None)
    return {
        "program": "mukv/run.py",
        "name": name or (preset or "sweep").replace("sweep/", "").replace("/", "_"),
        "method": "grid",
        "metric": {"name": "accuracy", "goal": "maximize"},
        "parameters": {key: {"values": values} for key, values in grid.items()},
        "command": [*SPEC_COMMAND_HEAD, *fixed, *SPEC_COMMAND_TAIL],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    wandb_cmd = sub.add_parser("wandb", help="print the W&B sweep spec of a `python -m mukv.run -m ...` grid")
    wandb_cmd.add_argument("--name", help="the sweep's name (default: the preset's)")
    wandb_cmd.add_argument("--out", type=Path, help="write the spec here instead of printing it")
    wandb_cmd.add_argument("overrides", nargs="+", help="the arguments of `python -m mukv.run -m`")
    methods = sub.add_parser("methods", help="the cache methods a sweep over the registry runs")
    methods.add_argument("kind", nargs="?", default="", choices=["", "budget"])
    args = parser.parse_args(argv)
    if args.command == "methods":
        print(method_list(args.kind))
        return 0
    spec = wandb_spec(list(args.overrides), args.name)
    command = spec.pop("command")
    text = (f"# W&B sweep spec generated by: python -m mukv.sweeps wandb {' '.join(args.overrides)}\n"
            "# (regenerate it rather than editing it: the grid lives in the Hydra preset)\n"
            + yaml.safe_dump(spec, sort_keys=False, default_flow_style=None)
            + yaml.safe_dump({"command": command}, default_flow_style=False))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}: wandb sweep {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
