"""CLI: ``python -m mukv.run [overrides]`` composes ``conf/`` and hands the config to ``train_eval``."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mukv.config import public_options, register_configs
from mukv.errors import MukvError

register_configs()
log = logging.getLogger("mukv")
DRY_RUN_ENV = "MUKV_DRY_RUN"  # =1: each job composes its config, prints its folder and stops (no model, no data)


# ------------------------------------------------------------------ errors a user can make on the command line
def _group_options(group: str) -> list[str]:
    """The options of a config group (search path included), schemas left out; [] if unknown."""
    try:
        from hydra.core.global_hydra import GlobalHydra

        app = GlobalHydra.instance().hydra
        if app is not None:
            return public_options(app.config_loader.get_group_options(group))
    except Exception:  # noqa: BLE001 (only for the message)
        pass
    folder = Path(__file__).resolve().parents[1] / "conf" / group
    return public_options(p.stem for p in folder.glob("*.yaml"))


def unknown_key_message(full_key: str, schema: Any) -> str:
    """One line for a key that the structured schema of its node does not declare."""
    if dataclasses.is_dataclass(schema):
        parent = full_key.rpartition(".")[0] or "top-level"
        keys = [f.name for f in dataclasses.fields(schema) if f.name != "_target_"]
        return f"unknown config key '{full_key}' ({parent} keys: {', '.join(keys) or 'none'})"
    return f"unknown config key '{full_key}'"


def _first_line(text: object) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def config_error_line(ex: BaseException) -> str:
    """One line for a Hydra / OmegaConf composition error (unknown key or option, wrong type, bad syntax)."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(ex, MissingConfigException) and ex.missing_cfg_file:
        group, _, name = str(ex.missing_cfg_file).rpartition("/")
        options = _group_options(group) if group else []
        if not options and ex.options:
            options = public_options(ex.options)
        listed = f" (options: {', '.join(options)})" if options else ""
        return f"unknown option '{name}' for {group or 'the config'}{listed}" if group else _first_line(ex) + listed
    if isinstance(ex, OverrideParseException):
        return f"cannot parse override '{ex.override}': {_first_line(ex)}"
    cause = ex if isinstance(ex, OmegaConfBaseException) else ex.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and " not in " in str(cause):
            return unknown_key_message(str(cause.full_key), getattr(cause, "object_type", None))
        return f"config field '{cause.full_key}': {_first_line(getattr(cause, 'msg', cause))}"
    lines = [line.strip() for line in str(ex).splitlines() if line.strip()]
    parts = lines[:2] if lines and lines[0].endswith(":") else lines[:1]  # "In 'x': ... composing config:" + why
    if ex.__cause__ is not None and _first_line(ex.__cause__) not in parts:
        parts.append(_first_line(ex.__cause__))
    return " ".join(p for p in parts if p)


def _raised_in_job(ex: BaseException) -> bool:
    tb = ex.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "run_job":
            return True
        tb = tb.tb_next
    return False


def install_config_error_handler() -> None:
    """Composition errors (before any job runs) become one ``error:`` line and exit status 2.

    Hydra prints them over several lines (twice with a cause) and exits 1, like a crash. Errors raised inside
    the job keep Hydra's report; ``HYDRA_FULL_ERROR=1`` keeps Hydra's full traceback for everything.
    """
    import hydra._internal.utils as hydra_utils
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    original = hydra_utils.run_and_report
    if getattr(original, "mukv_config_errors", False):
        return

    def run_and_report(func: Any) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except (HydraException, OmegaConfBaseException) as ex:
                if os.environ.get("HYDRA_FULL_ERROR") == "1" or _raised_in_job(ex):
                    raise
                print(f"error: {config_error_line(ex)}", file=sys.stderr)
                sys.exit(2)

        return original(guarded)

    run_and_report.mukv_config_errors = True  # type: ignore[attr-defined]
    hydra_utils.run_and_report = run_and_report


def check_composed(cfg: DictConfig) -> None:
    """What composition lets through: a ``<group>=<name>_schema`` choice, keys added with ``+``/``++``."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    for group, option in (choices or {}).items():
        if option is not None and str(option).endswith("_schema"):
            options = ", ".join(_group_options(str(group)))
            raise MukvError(f"{group}={option} is the schema that {group} configs extend, not an option "
                            f"(options: {options})")

    def walk(node: DictConfig, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
        for key in node.keys():
            full_key = f"{prefix}{key}"
            if declared is not None and key not in declared:
                raise MukvError(unknown_key_message(full_key, schema))
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                walk(child, full_key + ".")

    walk(cfg, "")


def _log_to_file(message: str) -> None:
    """The error into run.log only: the console gets it once, as the ``error:`` line."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from mukv.train_eval import format_summary, train_eval

    try:
        check_composed(cfg)
        if os.environ.get(DRY_RUN_ENV) == "1":
            hc = HydraConfig.get()
            job = f"job {hc.job.num}" if hc.mode == RunMode.MULTIRUN else "run"
            print(f"dry run ({DRY_RUN_ENV}=1): {job} -> {hc.runtime.output_dir}: "
                  f"{' '.join(hc.overrides.task) or '(no overrides)'}")
            return
        result = train_eval(cfg)
    except MukvError as err:
        _log_to_file(str(err))
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"\n{result.metrics.get('dataset')} / {result.metrics.get('method')} -> {result.output_dir}")
    print(format_summary(result.metrics))
    if not result.ok:
        if result.metrics.get("failed_videos"):
            print(f"{result.metrics['failed_videos']} video(s) failed: see memory_stats.csv (error column)",
                  file=sys.stderr)
        if result.metrics.get("failed_questions"):
            print(f"{result.metrics['failed_questions']} question(s) failed: see predictions.csv (error column)",
                  file=sys.stderr)
        if HydraConfig.get().mode != RunMode.MULTIRUN:  # in a sweep, the other jobs still run
            sys.exit(1)


if __name__ == "__main__":
    install_config_error_handler()
    main()
