"""mukv_nano's recipe and loop: the Hydra schema is generated from the dataclasses (every knob once, every knob
settable), the recipes of conf/nano_recipe change only their knobs, bad values are refused by name before
anything loads, the curriculum draws what it says, and a run (function and command line) writes its
checkpoints and metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from mukv.data.synthetic import QUESTION_TYPES, TRAIN_SEED_BASE, SyntheticSpec
from mukv.errors import ConfigError
from mukv_nano.curriculum import Curriculum
from mukv_nano.examples import make_example
from mukv_nano.recipe import SIGNALS, LoopConfig, NetConfig, Recipe, Signals, recipe_from_config, register_configs
from mukv_nano.train import batch_loss, build_signals, train_from_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
RECIPES = sorted(p.stem for p in (CONF / "nano_recipe").glob("*.yaml"))
# a run of a few seconds: 2 steps of one 2-frame stream, 1 validation stream
TINY = ("train.steps=2", "train.batch_size=1", "train.val_videos=1", "train.threads=1", "train.bf16=false",
        "curriculum.max_frames=2", "curriculum.questions_per_stream=2")


def compose_train(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train_nano", overrides=list(overrides))
    cfg.paths.root_dir = str(ROOT)
    cfg.paths.output_dir = "/tmp/mukv-test-out"
    return cfg


# ------------------------------------------------------------------------------------------- config
def test_core_never_imports_the_recipe():
    """mukv (evaluation) stands alone: no module of it imports mukv_nano."""
    pattern = re.compile(r"^\s*(from|import)\s+mukv_nano\b|import_module\(.mukv_nano", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "mukv").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
    assert not (ROOT / "mukv" / "train.py").exists()
    assert "mukv_nano, mukv_nano.*" in (ROOT / "setup.cfg").read_text()  # pip install ships it beside mukv


def test_schema_is_generated_from_the_dataclasses_with_their_defaults():
    """conf/train_nano.yaml sets no knob: the composed config is exactly the dataclasses' fields and defaults,
    one section per signal of SIGNALS, so the recipe read back equals ``Recipe()``."""
    cfg = compose_train()
    for section, cls in (("train", LoopConfig), ("net", NetConfig), ("curriculum", Curriculum)):
        assert OmegaConf.to_container(cfg[section]) == dataclasses.asdict(cls()), section
    assert list(cfg.signals) == list(SIGNALS)
    for name, signal in SIGNALS.items():
        assert OmegaConf.to_container(cfg.signals[name]) == dataclasses.asdict(signal.Config()), name
    assert recipe_from_config(cfg) == Recipe()
    assert cfg.task_name == "train_nano" and cfg.model.name == "nano" and cfg.dataset.name == "synthetic"
    assert "mode" not in cfg and "train" in cfg
    text = (CONF / "train_nano.yaml").read_text()
    assert "signals:" not in text and "curriculum:" not in text  # no second definition of a knob


# the flat knob names of the recipe's earlier home (mukv/train.py, before mukv_nano) -> their Hydra paths now
FLAT_NAMES = {
    "aux_weight": "signals.probe.weight", "probe_cells": "signals.probe.cells", "probe_words": "signals.probe.words",
    **{f"attend_{k}": f"signals.attend.{k}" for k in ("weight", "layers", "head", "types", "until")},
    **{f"count_{k}": f"signals.count.{k}" for k in ("weight", "layer", "head")},
    **{f"count_probe_{k}": f"signals.count_probe.{k}" for k in ("weight", "layer", "until")},
    **{f"parse_{k}": f"signals.parse.{k}" for k in ("weight", "layer", "attend_layers")},
    **{f"motion_{k}": f"signals.motion.{k}" for k in ("weight", "layer", "attend_layers", "attend_heads", "words")},
    **{f"order_{k}": f"signals.order.{k}" for k in ("weight", "layer", "attend_layers", "attend_heads", "until")},
    **{f"separate_{k}": f"signals.separate.{k}" for k in ("weight", "margin")},
    **{k: f"net.{k}" for k in ("cell_words", "text_heads", "text_kv_heads", "init_from")},
    **{k: f"curriculum.{k}" for k in ("min_frames", "max_frames", "short_phase", "ramp_end", "mid_frames", "long_share",
                                      "empty_until", "full_only_until", "layout_weights", "detail_only_until",
                                      "all_types_from", "detail_share", "subset_share", "sample_fps",
                                      "questions_per_stream")},
    **{k: f"train.{k}" for k in ("steps", "max_minutes", "batch_size", "lr", "weight_decay", "warmup", "grad_clip",
                                 "bf16", "save_every_s", "val_videos", "seed", "threads")},
}


def test_the_default_recipe_is_the_shipped_checkpoints():
    """``python -m mukv_nano.train`` with no override is what trained mukv/assets/nano (its mukv_nano.json
    records the settings, ``bf16`` resolved on the machine that ran it), knob by knob."""
    from mukv.models.nano import ASSET_DIR, read_meta

    shipped = read_meta(ASSET_DIR)["settings"]
    if "net" in shipped:  # recorded by mukv_nano: the nested recipe
        shipped = {f"{s}.{k}": v for s, knobs in shipped.items() for k, v in knobs.items() if not isinstance(v, dict)
                   or k == "layout_weights"} | {f"signals.{n}.{k}": v for n, c in shipped["signals"].items()
                                                for k, v in c.items()}
    else:
        assert set(shipped) == set(FLAT_NAMES)
        shipped = {FLAT_NAMES[k]: v for k, v in shipped.items()}
    cfg = compose_train()
    for path, value in shipped.items():
        if path not in ("train.bf16", "train.publish"):
            assert OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, path)}))["v"] == value, path


def test_every_knob_is_settable_and_typos_fail_at_compose_time():
    """``curriculum.layout_weights`` included; an unknown key or a wrong type fails while composing."""
    cfg = compose_train("curriculum.layout_weights.full=0.9", "signals.order.attend_heads=[0,1]",
                        "signals.attend.head=2", "net.text_heads=4", "net.text_kv_heads=2", "train.publish=true")
    recipe = recipe_from_config(cfg)
    assert recipe.curriculum.layout_weights["full"] == 0.9 and recipe.curriculum.layout_weights["mukv"] == 0.2
    assert recipe.signals.order.attend_heads == [0, 1] and recipe.signals.attend.head == "2"
    assert recipe.net.head_dims() == {"text_heads": 4, "text_kv_heads": 2} and recipe.train.publish
    for bad in ("signals.order.wieght=1", "signals.count.head=abc", "curriculum.ramp=0.5", "mode=train"):
        with pytest.raises(ConfigCompositionException):
            compose_train(bad)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_compose_and_are_checked(recipe):
    cfg = compose_train(f"nano_recipe={recipe}")
    recipe_from_config(cfg)
    assert cfg.task_name == f"train_nano_{recipe}"


def test_recipes_change_only_their_knobs():
    """Each earlier recipe is the current one with its own knobs set: the ablations they stand for."""
    def knobs(*overrides):
        cfg = compose_train(*overrides)
        return {f"{s}.{k}": v for s in ("train", "net", "curriculum") for k, v in cfg[s].items()} | {
            f"signals.{n}.{k}": v for n in cfg.signals for k, v in cfg.signals[n].items()}

    recipe = knobs()
    assert recipe["signals.count.weight"] > 0 and 0 < recipe["signals.attend.until"] < 1 and recipe["net.cell_words"]
    assert recipe["signals.order.weight"] > 0 and 0 < recipe["signals.order.until"] < 1
    assert recipe["net.text_heads"] is None and recipe["curriculum.subset_share"] > 0
    assert recipe["signals.count_probe.weight"] > 0 and 0 < recipe["signals.count_probe.until"] < 1
    day = {"net.text_heads": 4, "net.text_kv_heads": 2, "curriculum.subset_share": 0.0, "signals.count_probe.weight": 0.0}
    assert knobs("nano_recipe=before_count_readout") == {**recipe, **day}  # those four knobs only
    assert knobs("nano_recipe=without_order") == {**recipe, **day, "signals.order.weight": 0.0}
    assert knobs("nano_recipe=order_to_end") == {**recipe, **day, "signals.order.until": 1.0}
    assert knobs("nano_recipe=current") == {**recipe, **day, "signals.attend.until": 1.0, "signals.count.weight": 0.0,
                                            "signals.order.weight": 0.0}
    assert knobs("nano_recipe=previous_recipe") == {
        **recipe, **day, "net.cell_words": False, "signals.parse.weight": 0.0, "signals.attend.weight": 0.0,
        "signals.count.weight": 0.0, "signals.order.weight": 0.0}


@pytest.mark.parametrize("overrides,field", [
    (("signals.attend.head=first",), "signals.attend.head"),
    (("signals.attend.types=[detail,colour]",), "signals.attend.types"),
    (("net.cell_words=false",), "signals.parse.weight"),  # the asked-cell probe reads the cell words
    (("signals.attend.until=1.5",), "signals.attend.until"),
    (("signals.order.until=-0.1",), "signals.order.until"),
    (("signals.count.head=-1",), "signals.count.head"),
    (("signals.count.layer=-2",), "signals.count.layer"),
    (("signals.count.head=8",), "signals.count.head"),  # the recipe's model has 8 heads
    (("signals.count_probe.layer=4",), "signals.count_probe.layer"),  # ... and 4 layers
    (("signals.motion.attend_heads=[-1]",), "signals.motion.attend_heads"),
    (("signals.order.attend_heads=[8]",), "signals.order.attend_heads"),
    (("net.init_from=/nowhere/nano",), "net.init_from"),
    (("net.text_heads=5",), "net.text_heads"),  # 192 is not a multiple of 5
    (("net.text_heads=8", "net.text_kv_heads=3"), "net.text_kv_heads"),
    (("curriculum.subset_share=1.5",), "curriculum.subset_share"),
    (("+curriculum.layout_weights.nope=1",), "curriculum.layout_weights"),
    (tuple(f"curriculum.layout_weights.{name}=0" for name in ("full", "uniform", "window", "rekv", "mukv")),
     "curriculum.layout_weights"),
    (("curriculum.min_frames=1",), "curriculum.min_frames"),
    (("train.lr=0",), "train.lr"),
    (("model=tiny",), "model"),
    (("dataset=rvs_ego",), "dataset"),
])
def test_invalid_values_are_refused_by_name_before_anything_loads(overrides, field, tmp_path):
    cfg = compose_train(*TINY, *overrides)  # TINY: were a value let through, the run would end in seconds
    with pytest.raises(ConfigError) as err:
        train_from_config(cfg, tmp_path / "run")
    assert err.value.field == field and field in str(err.value)
    assert not (tmp_path / "run").exists()


def test_head_indices_are_checked_against_the_model_it_will_train():
    """Before any model loads: the heads of the model built from net.text_heads, or of the init_from
    checkpoint (read from its config alone)."""
    from mukv.models.nano import ASSET_DIR

    small = ("net.text_heads=4", "net.text_kv_heads=2")
    recipe_from_config(compose_train(*small, "signals.count.head=3"))
    with pytest.raises(ConfigError, match="signals.count.head.*below 4"):
        recipe_from_config(compose_train(*small, "signals.count.head=5"))
    with pytest.raises(ConfigError, match="signals.motion.attend_heads.*below 4"):
        recipe_from_config(compose_train(*small, "signals.motion.attend_heads=[4]"))
    shipped = (f"net.init_from={ASSET_DIR}",)
    recipe_from_config(compose_train(*shipped, "signals.count.head=7"))  # the shipped checkpoint has 8 heads
    with pytest.raises(ConfigError, match="signals.attend.head.*below 8"):
        recipe_from_config(compose_train(*shipped, "signals.attend.head=8"))
    recipe_from_config(compose_train(*small, "signals.count.head=5", "signals.count.weight=0"))  # off: not checked


# --------------------------------------------------------------------------------------- curriculum
def test_curriculum_moves_from_short_detail_streams_to_all_types_and_layouts():
    c = Curriculum()
    rng = random.Random(0)
    assert c.step_types(0.0, rng) == (("detail",), 0)
    assert c.step_types(0.2, rng) == (("detail", "count", "current"), None)
    late = [c.step_types(0.8, rng)[0] for _ in range(1000)]
    assert set(late) == {("detail",), QUESTION_TYPES} and 0.05 < late.count(("detail",)) / 1000 < 0.15
    assert all(c.sample_step(0.05, rng)[0] <= 4 and c.sample_step(0.05, rng)[2] == "full" for _ in range(50))
    assert c.sample_step(0.01, rng)[1] == 1e6  # no distractors at first
    steps = [c.sample_step(0.9, rng) for _ in range(2000)]
    assert max(n for n, _, _ in steps) == c.max_frames and abs(steps[0][1] - 4.0) < 1e-9
    long = sum(n > c.mid_frames for n, _, _ in steps) / len(steps)
    assert 0.1 < long < c.long_share  # a long_share of steps may go past mid_frames
    drawn = [layout for _, _, layout in steps]
    for name, w in c.layout_weights.items():
        assert abs(drawn.count(name) / len(drawn) - w) < 0.05, name
    only = Curriculum(layout_weights={"mukv": 1.0})
    assert {only.sample_step(0.5, rng)[2] for _ in range(20)} == {"mukv"}


def test_streams_can_carry_a_subset_of_the_types_and_the_model_its_own_head_count():
    """`curriculum.subset_share`: that share of all-type streams carries a random non-empty subset of the types
    (a count-only stream then shows no needle and no ball); other steps keep theirs. `net.text_heads` /
    `text_kv_heads` build the language model with those heads."""
    from mukv.data.synthetic import MOTION_SHAPE, SHAPES
    from mukv.models.nano import build_nano

    rng = random.Random(0)
    assert {Curriculum(subset_share=0.0).stream_types(QUESTION_TYPES, rng) for _ in range(200)} == {QUESTION_TYPES}
    every = Curriculum(subset_share=1.0)
    assert every.stream_types(("detail",), rng) == ("detail",)  # the detail-only steps keep their type
    drawn = [every.stream_types(QUESTION_TYPES, rng) for _ in range(2000)]
    assert all(d and d == tuple(t for t in QUESTION_TYPES if t in d) for d in drawn)
    assert len(set(drawn)) == 2 ** len(QUESTION_TYPES) - 1  # every non-empty subset occurs
    quarter = [Curriculum().stream_types(QUESTION_TYPES, rng) != QUESTION_TYPES for _ in range(4000)]
    assert 0.2 < sum(quarter) / len(quarter) < 0.27
    for i in range(6):
        ex = make_example(TRAIN_SEED_BASE + i, 16, 0.5, 4.0, types=("count",), questions=12)
        assert {q.qtype for q in ex.questions} == {"count"} and ex.needle_tokens == ()
        assert SHAPES.index(MOTION_SHAPE) not in set(ex.cell_shape.ravel().tolist())  # no ball either
    default = build_nano(seed=0, **NetConfig().head_dims())[0].config.text_config
    assert (default.num_attention_heads, default.num_key_value_heads) == (8, 4)  # NANO_DIMS
    model, _ = build_nano(seed=0, **NetConfig(text_heads=4, text_kv_heads=2).head_dims())  # the recipes before 2026-11-28
    text = model.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert model.model.language_model.layers[0].self_attn.k_proj.out_features == 2 * text.hidden_size // 4


def test_training_never_sees_held_out_seeds():
    with pytest.raises(ConfigError, match="training seeds"):
        make_example(5, 4, 0.5, 4.0)  # an evaluation seed
    with pytest.raises(ConfigError, match="evaluation seeds"):
        SyntheticSpec(seed=TRAIN_SEED_BASE)


# ------------------------------------------------------------------------------------------- the loop
def test_a_few_training_steps_reduce_the_loss():
    from mukv.models import attention_hook
    from mukv.models.adapter import DEFAULT_INIT_PROMPT
    from mukv.models.nano import build_nano
    from mukv.models.rope import RotaryTable

    model, tok = build_nano(seed=0)
    model.model.language_model.config._attn_implementation = attention_hook.register()
    model.train()
    rope = RotaryTable(model.model.language_model.rotary_emb.inv_freq)
    init = tok(DEFAULT_INIT_PROMPT, add_special_tokens=False).input_ids
    examples = [make_example(TRAIN_SEED_BASE + i, 3, 0.5, 8.0) for i in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        loss, _ = batch_loss(model, rope, tok, init, examples, "full", random.Random(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    # only the signals the recipe turns on are built (their probes' parameters are the only extra ones)
    recipe = Recipe(signals=Signals(order=SIGNALS["order"].Config(weight=0.0)))
    assert [s.name for s in build_signals(recipe, model, tok)] == [n for n in SIGNALS if n != "order"]


def test_train_from_config_writes_checkpoints_metrics_and_publishes(tmp_path, monkeypatch):
    """A two-step run: ``<run>/nano/{last,best}`` load as nano checkpoints (the evaluation's loader), their
    record holds the recipe and history, ``metrics.json`` the validation by type; ``train.publish=true``
    copies the best over the asset folder (here a temporary one)."""
    import mukv.models.nano as nano_module
    from mukv.models.loading import load_video_llm
    from mukv.models.nano import read_meta

    monkeypatch.setattr(nano_module, "ASSET_DIR", tmp_path / "assets")
    cfg = compose_train(*TINY, "train.publish=true", "signals.attend.until=1.0")
    metrics = train_from_config(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert metrics["method"] == "train" and metrics["model"] == "nano" and metrics["dataset"] == "synthetic"
    assert metrics["steps"] == 3 and metrics["checkpoint"] == str(run / "nano" / "best") and metrics["wall_s"] > 0
    val = metrics["val_accuracy"]  # by type (2-frame streams have no ball run: no motion question)
    assert {"detail", "count", "mean"} <= set(val) <= {*QUESTION_TYPES, "mean"} and metrics["accuracy"] == val["mean"]
    for tag in ("last", "best"):
        meta = read_meta(run / "nano" / tag)
        assert meta["settings"]["signals"]["attend"]["until"] == 1.0 and meta["settings"]["train"]["bf16"] is False
        assert meta["steps"] == 3 and meta["val"] == metrics["val_accuracy"]
    llm = load_video_llm("nano", str(run / "nano" / "best"), device="cpu", dtype="float32")
    assert llm.geometry.tokens_per_frame == 16
    assert {p.name for p in (tmp_path / "assets").iterdir()} == {p.name for p in (run / "nano" / "best").iterdir()}
    assert yaml_keys(run / "resolved_config.yaml") >= {"train", "net", "curriculum", "signals", "model", "dataset"}


def yaml_keys(path: Path) -> set[str]:
    return set(OmegaConf.load(path).keys())


def test_command_line_runs_into_its_folder_and_refuses_typos_in_one_line(tmp_path):
    """``python -m mukv_nano.train``: the run lands in ``outputs/train_nano/<time>/`` (``MUKV_OUTPUTS``
    stands for outputs/); an unknown key stops it before anything runs, one ``error:`` line, exit status 2."""
    env = {**os.environ, "MUKV_OUTPUTS": str(tmp_path / "outputs"), "HYDRA_FULL_ERROR": "0"}
    bad = subprocess.run([sys.executable, "-m", "mukv_nano.train", "signals.count.hed=1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: unknown config key 'signals.count.hed' (signals.count keys: weight, until, layer, head)"]
    ok = subprocess.run([sys.executable, "-m", "mukv_nano.train", *TINY, "train.steps=1"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    (run,) = (tmp_path / "outputs" / "train_nano").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and (run / "nano" / "best" / "model.safetensors").is_file()
    assert "val accuracy" in ok.stdout and str(run) in ok.stdout
