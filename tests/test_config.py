"""Every config group option composes through Hydra's compose API; typos and bad values fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_cfg
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from mukv.config import register_configs
from mukv.errors import ConfigError
from mukv.models.loading import model_geometry
from mukv.train_eval import build_method, validate_config

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()



def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_default_config_composes_and_validates():
    cfg = compose_cfg()
    assert cfg.model._target_.endswith("NanoModel") and cfg.dataset._target_.endswith("SyntheticDataset")
    assert "mode" not in cfg and "train" not in cfg and "seed" not in cfg  # eval reads no training recipe
    validate_config(cfg)


@pytest.mark.parametrize("group,option,cls", [
    ("model", "tiny", "mukv.models.loading.TinyModel"), ("model", "llava_ov_0.5b", "mukv.models.loading.PretrainedModel"),
    ("dataset", "rvs_movie", "mukv.data.datasets.RVSDataset"), ("dataset", "synthetic_long", "mukv.data.datasets.SyntheticDataset"),
    ("dataset", "ovo_bench", "mukv.data.datasets.OVOBenchDataset"),
    ("judge", "openai", "mukv.judge.openai.OpenAIJudge"), ("judge", "hf", "mukv.judge.hf.HFJudge"),
    ("judge", "choice", "mukv.judge.choice.ChoiceJudge"),
    ("judge", "exact", "mukv.judge.exact.ExactMatchJudge"), ("judge", "none", None),
])
def test_models_datasets_and_judges_are_named_by_target(group, option, cls):
    """What a run builds is the class its config's ``_target_`` names (no name / kind switch)."""
    from mukv.components import component_class

    node = compose_cfg(f"{group}={option}")[group]
    built = component_class(node, group)
    assert (built is None) if cls is None else f"{built.__module__}.{built.__qualname__}" == cls


@pytest.mark.parametrize("override", ["judge.base_url=http://x", "judge.device=cpu", "dataset.annotation=x.json",
                                      "model.kind=nano", "mode=train", "train.steps=3", "seed=1"])
def test_options_of_another_kind_are_refused_at_compose_time(override):
    """The exact judge has no endpoint, the synthetic dataset no annotation file, and eval no training recipe."""
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_cfg(override)
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_cfg("judge=hf", "judge.base_url=http://x")


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


@pytest.mark.parametrize("override", ["engine.answer_text=stripped", "logger.mode=sometimes", "logger.name=mlflow",
                                      "dataset.past_end=skip", "model.resize=bilinear", "model.dtype=float8",
                                      "model.attn_implementation=flash3", "dataset.synthetic.question_times=never",
                                      "dataset.synthetic.question_types=[detail,colour]"])
def test_bad_choice_fails_at_compose_time_naming_the_field(override):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_cfg(override)
    assert override.split("=")[0] in str(err.value) + str(err.value.__cause__)


def test_unknown_group_option_fails():
    with pytest.raises(ConfigCompositionException, match="cache"):
        compose_cfg("cache=no_such_method")


@pytest.mark.parametrize("override,field", [
    ("dataset.sample_fps=0", "dataset.sample_fps"),
    ("engine.max_new_tokens=-1", "engine.max_new_tokens"),
    ("dataset.synthetic.num_videos=0", "dataset.synthetic.num_videos"),
    ("judge._target_=mukv.judge.oracle.Oracle", "judge._target_"),
    ("model._target_=mukv.judge.exact.ExactMatchJudge", "model._target_"),
    ("dataset._target_=mukv.models.loading.NanoModel", "dataset._target_"),
    ("budget_frames=0", "budget_frames"),
    ("dataset.synthetic.needle_depth=1.5", "dataset.synthetic.needle_depth"),
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
