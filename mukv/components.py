"""Config nodes name what they build: ``_target_`` in a model, dataset, judge or cache config is a class path.

Each kind has a small class protocol (checked before anything loads, then built): models
``mukv.models.loading.ModelLoader`` (``geometry`` / ``load``), datasets ``mukv.data.datasets.Dataset``
(``check_config`` / ``load``), judges ``mukv.judge.base.Judge`` (``check_config`` / ``from_config``), cache
methods ``mukv.cache.base.CacheMethod`` (the dataclass of its knobs).
"""

from __future__ import annotations

from typing import Any

from mukv.errors import ConfigError


def component_class(node: Any, group: str) -> type | None:
    """The class ``<group>._target_`` names; None where the target is null (e.g. ``judge=none``)."""
    target = node.get("_target_") if node is not None else None
    if target is None:
        return None
    from hydra.utils import get_class

    try:
        return get_class(str(target))
    except Exception as err:  # hydra raises a generic error for a bad import path
        raise ConfigError(f"{group}._target_", f"cannot import '{target}': {err}") from err
