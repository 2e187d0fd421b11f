"""CLI: ``python -m mukv.run [overrides]`` composes ``conf/`` and hands the config to ``train_eval``."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mukv.config import register_configs
from mukv.errors import MukvError

register_configs()
log = logging.getLogger("mukv")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from mukv.train_eval import format_summary, train_eval

    try:
        result = train_eval(cfg)
    except MukvError as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"\n{result.metrics.get('dataset')} / {result.metrics.get('method')} -> {result.output_dir}")
    print(format_summary(result.metrics))
    if not result.ok:
        print(f"{len(result.failures)} video(s) failed: see memory_stats.csv (error column)", file=sys.stderr)
        if HydraConfig.get().mode != RunMode.MULTIRUN:  # in a sweep, the other jobs still run
            sys.exit(1)


if __name__ == "__main__":
    main()
