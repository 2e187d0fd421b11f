"""String options of cache methods are enums: a bad value fails when the config is composed, naming the
field, while the method code, the YAML files and everything written out still see plain strings."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from conftest import compose_cfg
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from mukv.cache import CACHE_METHODS
from mukv.cache.options import StrOption
from mukv.config import register_configs
from mukv.errors import ConfigError
from mukv.models.loading import model_geometry
from mukv.train_eval import build_method

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()
FREE_FORM_STRINGS = {"spill_dir", "local_prompt", "global_prompt", "guidance_prompt"}  # a folder, prompts: any string



@pytest.mark.parametrize("cache,override", [
    ("mukv", "cache.frequency=fftt"),  # MuKV's own options
    ("mukv", "cache.assembly=by_score"),
    ("mukv_shared_context", "cache.block_context=mixed"),
    ("rekv", "cache.scoring=euclid"),  # ReKV's
    ("rekv", "cache.kv_quant=int2"),  # the block store's (StoreOptions), both methods
    ("mukv", "cache.kv_quant=fp8"),
    ("sliding_window", "cache.sink_handover=never"),  # the sink + window encoding's (SinkWindowOptions)
    ("rekv", "cache.sink_distance=far"),
])
def test_a_bad_string_option_fails_at_compose_time_naming_the_field(cache, override):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_cfg(f"cache={cache}", override)
    text = str(err.value) + str(err.value.__cause__)
    field, bad = override.split("=")
    assert field.split(".")[-1] in text and bad in text


def test_every_string_knob_of_every_method_is_an_enum():
    """A new ``str`` knob would silently accept anything at compose time: knobs that pick among values are
    ``StrOption`` enums (free-form strings, such as a folder, are listed here)."""
    for name, cls in CACHE_METHODS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            plain = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if str in plain:
                assert f.name in FREE_FORM_STRINGS, f"{name}.{f.name} is a plain str; make it a StrOption"
            if isinstance(tp, type) and issubclass(tp, StrOption):
                assert isinstance(f.default, tp), f"{name}.{f.name}: the default is not a {tp.__name__}"


def test_options_reach_the_method_as_strings_and_are_written_as_strings():
    cfg = compose_cfg("cache=mukv_mean_query", "cache.frequency=diff", "cache.kv_quant=int8",
                      "cache.kv_quant_group_size=8")
    method = build_method(cfg.cache)
    assert method.frequency == "diff" and f"{method.frequency}" == "diff" and str(method.query_vector) == "mean_query"
    assert method.kv_quant == "int8" and {"int8": 1}[method.kv_quant] == 1  # hashes as its value
    method.validate(model_geometry("tiny", None, "cpu", "float32"))
    resolved = OmegaConf.to_yaml(cfg.cache)
    assert "frequency: diff" in resolved and "query_vector: mean_query" in resolved
    assert OmegaConf.to_container(cfg.cache, enum_to_str=True)["frequency"] == "diff"  # the run fingerprint's form


@pytest.mark.parametrize("name,knobs,field", [
    ("mukv", {"frequency": "fftt"}, "cache.frequency"),
    ("rekv", {"scoring": "euclid"}, "cache.scoring"),
    ("sliding_window", {"sink_handover": "never"}, "cache.sink_handover"),
    ("rekv", {"kv_quant": "int2"}, "cache.kv_quant"),
])
def test_a_method_built_by_hand_with_a_bad_string_is_refused_by_validate(name, knobs, field):
    with pytest.raises(ConfigError) as err:
        CACHE_METHODS[name](**knobs).validate(model_geometry("tiny", None, "cpu", "float32"))
    assert err.value.field == field
