"""Every config group option composes through Hydra's compose API; typos and bad values fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from mukv.config import register_configs
from mukv.errors import ConfigError
from mukv.models.loading import model_geometry
from mukv.train_eval import build_method, validate_config

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides))
    # ${hydra:...} resolves only inside a running app: give the paths concrete values.
    cfg.paths.root_dir = str(CONF.parent)
    cfg.paths.output_dir = "/tmp/mukv-test-out"
    return cfg


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_default_config_composes_and_validates():
    cfg = compose_cfg()
    assert cfg.model.kind == "nano" and cfg.dataset.kind == "synthetic" and cfg.mode == "eval"
    validate_config(cfg)


@pytest.mark.parametrize("name", options("cache"))
def test_every_cache_option_instantiates_and_fits_the_tiny_model(name):
    cfg = compose_cfg(f"cache={name}")
    method = build_method(cfg.cache)
    method.validate(model_geometry("tiny", None, "cpu", "float32"))
    assert method.name in name


@pytest.mark.parametrize("group", ["model", "dataset", "judge", "logger", "engine", "paths", "experiment"])
def test_every_option_of_every_group_composes(group):
    for name in options(group):
        cfg = compose_cfg(f"{group}={name}")
        assert OmegaConf.to_container(cfg.model, resolve=True)
        assert cfg.dataset.name


def test_rvs_datasets_resolve_paths_under_the_data_dir():
    cfg = compose_cfg("dataset=rvs_ego")
    assert cfg.dataset.annotation == f"{CONF.parent}/data/rvs/ego4d_oe.json"
    assert compose_cfg("dataset=rvs_movie").dataset.sample_fps == 1.0


@pytest.mark.parametrize("override", ["cache.n_locl=5", "model.dtyp=float32", "dataset.sample_fsp=1", "engine.chunk=3"])
def test_typo_in_override_fails_at_compose_time(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_cfg("cache=sliding_window", override)
    assert override.split("=")[0].split(".")[-1] in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("override", ["engine.max_new_tokens=many", "dataset.sample_fps=fast", "cache.n_local=1.5x"])
def test_wrong_type_fails_at_compose_time(override):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_cfg("cache=sliding_window", override)
    assert override.split("=")[0].split(".")[-1] in str(err.value) + str(err.value.__cause__)


def test_unknown_group_option_fails():
    with pytest.raises(ConfigCompositionException, match="cache"):
        compose_cfg("cache=no_such_method")


@pytest.mark.parametrize("override,field", [
    ("dataset.sample_fps=0", "dataset.sample_fps"),
    ("engine.max_new_tokens=-1", "engine.max_new_tokens"),
    ("engine.answer_text=stripped", "engine.answer_text"),
    ("model.dtype=float8", "model.dtype"),
    ("dataset.synthetic.num_videos=0", "dataset.synthetic.num_videos"),
    ("logger.mode=sometimes", "logger.mode"),
    ("judge.name=oracle", "judge.name"),
    ("mode=serve", "mode"),
    ("dataset.synthetic.needle_depth=1.5", "dataset.synthetic.needle_depth"),
    ("dataset.synthetic.question_times=never", "dataset.synthetic.question_times"),
    ("dataset.synthetic.question_types=[detail,colour]", "dataset.synthetic.question_types"),
])
def test_invalid_values_raise_config_error_naming_the_field(override, field):
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert err.value.field == field and field in str(err.value)


def test_needle_depth_is_a_config_knob_and_recorded():
    from mukv.train_eval import build_dataset

    videos = build_dataset(compose_cfg("dataset.synthetic.needle_depth=0.25", "dataset.synthetic.question_types=[detail]",
                                       "dataset.synthetic.question_times=end", "dataset.synthetic.duration_s=82"))
    detail = [q for v in videos for q in v.questions if q.qtype == "detail"]
    depths, frames = [q.meta["needle_depth"] for q in detail], [q.meta["needle_frame"] for q in detail]
    assert depths and all(d == pytest.approx(10 / 40) for d in depths) and set(frames) == {10}


def test_cache_knob_out_of_range_names_the_field():
    cfg = compose_cfg("cache=sliding_window", "cache.n_local=0")
    with pytest.raises(ConfigError, match="cache.n_local"):
        build_method(cfg.cache).validate(model_geometry("tiny", None, "cpu", "float32"))


def test_training_head_indices_are_checked_against_the_model_it_will_train():
    """Before any model loads: the heads of the model built from train.text_heads, or of the init_from
    checkpoint (read from its config alone)."""
    from mukv.models.nano import ASSET_DIR

    small = ("mode=train", "model=nano", "dataset=synthetic", "train.text_heads=4", "train.text_kv_heads=2")
    validate_config(compose_cfg(*small, "train.count_head=3"))
    with pytest.raises(ConfigError, match="train.count_head.*below 4"):
        validate_config(compose_cfg(*small, "train.count_head=5"))
    with pytest.raises(ConfigError, match="train.motion_attend_heads.*below 4"):
        validate_config(compose_cfg(*small, "train.motion_attend_heads=[4]"))
    shipped = ("mode=train", "model=nano", "dataset=synthetic", f"train.init_from={ASSET_DIR}")
    validate_config(compose_cfg(*shipped, "train.count_head=7"))  # the shipped checkpoint has 8 heads
    with pytest.raises(ConfigError, match="train.attend_head.*below 8"):
        validate_config(compose_cfg(*shipped, "train.attend_head=8"))


def test_missing_annotation_file_is_named():
    cfg = compose_cfg("dataset=rvs_ego", "dataset.annotation=/nowhere/ego.json")
    with pytest.raises(ConfigError, match="/nowhere/ego.json"):
        validate_config(cfg)


@pytest.mark.parametrize("override,field", [
    ("train.attend_head=first", "train.attend_head"),
    ("train.attend_types=[detail,colour]", "train.attend_types"),
    ("train.cell_words=false", "train.parse_weight"),  # the asked-cell probe reads the cell words
    ("train.attend_until=1.5", "train.attend_until"),
    ("train.order_until=-0.1", "train.order_until"),
    ("train.count_head=-1", "train.count_head"),
    ("train.count_layer=-2", "train.count_layer"),
    ("train.count_head=8", "train.count_head"),  # the recipe's model has 8 heads
    ("train.count_probe_layer=4", "train.count_probe_layer"),  # ... and 4 layers
    ("train.init_from=/nowhere/nano", "train.init_from"),
])
def test_invalid_training_values_raise_config_error_naming_the_field(override, field):
    cfg = compose_cfg("mode=train", "model=nano", "dataset=synthetic", override)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert err.value.field == field and field in str(err.value)
    validate_config(compose_cfg("mode=train", "model=nano", "dataset=synthetic"))  # the recipe
    validate_config(compose_cfg("model=nano", "dataset=synthetic", "experiment=nano_current"))
    validate_config(compose_cfg("model=nano", "dataset=synthetic", "experiment=nano_previous_recipe"))
    for ablation in ("nano_without_order", "nano_order_to_end"):
        validate_config(compose_cfg("model=nano", "dataset=synthetic", f"experiment={ablation}"))
    validate_config(compose_cfg("mode=train", "model=nano", "dataset=synthetic", "train.attend_head=2",
                                "train.attend_types=[detail,motion]"))
    cfg = compose_cfg("model=nano", "dataset=synthetic", "experiment=nano_current")
    assert cfg.mode == "train" and cfg.train.cell_words and cfg.train.attend_types == ["current"]
    assert cfg.train.attend_until == 1.0 and cfg.train.count_weight == cfg.train.order_weight == 0  # as it was run
    recipe = compose_cfg("mode=train", "model=nano", "dataset=synthetic").train
    assert recipe.count_weight > 0 and 0 < recipe.attend_until < 1 and recipe.cell_words
    assert recipe.order_weight > 0 and 0 < recipe.order_until < 1
    cfg = compose_cfg("model=nano", "dataset=synthetic", "experiment=nano_previous_recipe")
    assert cfg.mode == "train" and not cfg.train.cell_words
    assert cfg.train.attend_weight == cfg.train.count_weight == cfg.train.order_weight == 0
    # the recipe's heads, mixed-type streams and counting readout; the earlier recipes are pinned as they were run
    from mukv.models.nano import NANO_DIMS
    assert recipe.text_heads is None and (NANO_DIMS["text_heads"], NANO_DIMS["text_kv_heads"]) == (8, 4)
    assert recipe.subset_share > 0 and recipe.count_probe_weight > 0 and 0 < recipe.count_probe_until < 1
    day = {"text_heads": 4, "text_kv_heads": 2, "subset_share": 0.0, "count_probe_weight": 0.0}
    before = compose_cfg("model=nano", "dataset=synthetic", "experiment=nano_before_count_readout").train
    validate_config(compose_cfg("model=nano", "dataset=synthetic", "experiment=nano_before_count_readout"))
    assert {**before} == {**recipe, **day}  # those four knobs only
    without = compose_cfg("model=nano", "dataset=synthetic", "experiment=nano_without_order").train
    assert {**without} == {**recipe, **day, "order_weight": 0.0}  # and then that one knob
    to_end = compose_cfg("model=nano", "dataset=synthetic", "experiment=nano_order_to_end").train
    assert {**to_end} == {**recipe, **day, "order_until": 1.0}
    for name in ("nano_current", "nano_previous_recipe"):
        train = compose_cfg("model=nano", "dataset=synthetic", f"experiment={name}").train
        assert {k: train[k] for k in day} == day, name


@pytest.mark.parametrize("model", ["llava_ov_0.5b", "llava_ov_7b"])
def test_llava_ov_configs_load_float16_on_cuda_as_published(model):
    """Both published releases load LLaVA-OV in float16; the CPU keeps float32 (half types are emulated)."""
    import torch

    from mukv.models.loading import resolve_dtype

    dtype = compose_cfg(f"model={model}").model.dtype
    assert resolve_dtype(dtype, torch.device("cuda")) == torch.float16
    assert resolve_dtype(dtype, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16  # the generic default is unchanged
    with pytest.raises(ConfigError, match="model.dtype"):
        resolve_dtype("float8", torch.device("cpu"))
