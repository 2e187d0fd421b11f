"""One registry: every cache method says how a budget in frames maps onto its knobs and where it sorts, and
``budget_frames=N`` applies that mapping in a run (resolved config, fingerprint, metrics)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import compose_cfg

from mukv.cache import CACHE_METHODS, budget_knobs, method_rank, ordered_methods
from mukv.cache.base import CacheMethod, budget_frames_for_tokens, budget_knobs_for_tokens, video_tokens
from mukv.config import register_configs
from mukv.errors import ConfigError
from mukv.train_eval import apply_budget, train_eval, validate_config

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()



PRESSES = ["knorm", "streaming_llm", "tova", "snapkv", "expected_attention"]  # keep_ratio per block: no budget


def test_the_shipped_methods_in_display_order():
    assert ordered_methods() == ["full", "sliding_window", "uniform", "rekv", "mukv", "streamkv", "infinipot_v", "hermes",
                                 "knorm",
                                 "streaming_llm", "tova", "snapkv", "expected_attention"]
    assert sorted(["mukv", "zzz_unregistered", "full", "rekv"], key=method_rank) == ["full", "rekv", "mukv",
                                                                                      "zzz_unregistered"]


@pytest.mark.parametrize("frames,tpf,expected", [
    (16, 16, {"full": {}, "sliding_window": {"n_local": 256}, "uniform": {"num_frames": 16},
              "rekv": {"retrieve_size": 16}, "mukv": {"top_k": [5, 8, 3]}, "streamkv": {"retrieve_size": 16},
              "infinipot_v": {"block_frames": 16, "keep_frames": 12},
              "hermes": {"kv_frames": 16, "kv_size": None}, **dict.fromkeys(PRESSES, {})}),
    (64, 196, {"full": {}, "sliding_window": {"n_local": 12544}, "uniform": {"num_frames": 64},
               "rekv": {"retrieve_size": 64}, "mukv": {"top_k": [20, 32, 12]}, "streamkv": {"retrieve_size": 64},
               "infinipot_v": {"block_frames": 64, "keep_frames": 48}, "hermes": {"kv_frames": 64, "kv_size": None},
               **dict.fromkeys(PRESSES, {})}),  # the published settings (InfiniPot-V's
    # own run is 32 / 24 frames on Qwen2-VL)
])
def test_budget_knobs_of_every_method(frames, tpf, expected):
    assert {m: budget_knobs(m, frames, tpf) for m in ordered_methods()} == expected


def test_every_budget_knob_is_a_knob_of_its_method():
    for name in ordered_methods():
        fields = {f.name for f in dataclasses.fields(CACHE_METHODS[name])}
        assert set(budget_knobs(name, 8, 16)) <= fields, name


def test_a_budget_knob_that_is_not_a_field_is_refused_not_dropped(monkeypatch):
    cls = CACHE_METHODS["rekv"]
    monkeypatch.setattr(cls, "budget_knobs", classmethod(lambda c, f, t: {"retrieve_size": f, "block_size": t}))
    with pytest.raises(ConfigError, match="block_size"):
        budget_knobs("rekv", 8, 16)


def test_budget_frames_writes_the_knobs_into_the_config():
    cfg = compose_cfg("cache=mukv", "budget_frames=32")
    assert apply_budget(cfg, 16) == {"top_k": [10, 16, 6]} and list(cfg.cache.top_k) == [10, 16, 6]
    untouched = compose_cfg("cache=mukv")
    assert apply_budget(untouched, 16) == {} and list(untouched.cache.top_k) == [20, 32, 12]
    assert apply_budget(compose_cfg("cache=full", "budget_frames=8"), 16) == {}  # full has no budget


def test_a_run_with_budget_frames_records_and_uses_the_knobs(tmp_path):
    cfg = compose_cfg("experiment=smoke", "cache=rekv", "budget_frames=3", "dataset.synthetic.questions_per_video=1")
    cfg.paths.output_dir = str(tmp_path)
    result = train_eval(cfg, tmp_path)
    assert result.ok and result.metrics["budget_frames"] == 3 and result.metrics["budget_knobs"] == {"retrieve_size": 3}
    assert "retrieve_size: 3" in (tmp_path / "resolved_config.yaml").read_text()
    stored = json.loads((tmp_path / "fingerprint.json").read_text())["config"]
    assert stored["budget_frames"] == 3 and stored["cache"]["retrieve_size"] == 3
    # the recalled context: the init prompt and 3 frames of 16 tokens (the smoke stream shows more than 3)
    import pandas as pd

    from mukv.models.nano import load_nano_checkpoint  # noqa: F401  (the nano model's 16 tokens per frame)

    rows = pd.read_csv(tmp_path / "predictions.csv")
    assert (rows.frames_seen > 3).all() and (rows.online_tokens - rows.online_tokens.min() == 0).all()
    full = compose_cfg("experiment=smoke", "cache=rekv", "dataset.synthetic.questions_per_video=1")
    full.paths.output_dir = str(tmp_path / "unbudgeted")
    unbudgeted = pd.read_csv(train_eval(full, tmp_path / "unbudgeted").output_dir / "predictions.csv")
    assert (unbudgeted.online_tokens - rows.online_tokens == 16 * (unbudgeted.frames_seen - 3)).all()


def test_display_order_is_a_class_attribute_not_a_knob():
    assert "display_order" not in {f.name for f in dataclasses.fields(CACHE_METHODS["mukv"])}
    assert CacheMethod.display_order > max(CACHE_METHODS[m].display_order for m in ordered_methods())


# ------------------------------------------------------------------------------------------ budgets in tokens
@pytest.mark.parametrize("frames,tpf,expected", [
    # the published settings on LLaVA-OV (196 tokens per frame): MuKV's 20 / 32 / 12 blocks of 4 / 19 / 627 kept
    # tokens = 8,212 video tokens, beside ReKV's and uniform's 64 frames = 12,544
    (64, 196, {"full": None, "sliding_window": 12544, "uniform": 12544, "rekv": 12544, "mukv": 8212, "streamkv": 96 * 196,
               "infinipot_v": 12544, "hermes": 12544, **dict.fromkeys(PRESSES)}),
    # the nano model (16 tokens per frame): MuKV 5 / 8 / 3 blocks of 4 (int(0.4) = 0: the whole block) / 1 / 51
    (16, 16, {"full": None, "sliding_window": 256, "uniform": 256, "rekv": 256, "mukv": 181, "streamkv": 24 * 16, "infinipot_v": 256,
              "hermes": 256, **dict.fromkeys(PRESSES)}),
])
def test_video_tokens_of_every_method_at_its_frame_budget(frames, tpf, expected):
    assert {m: video_tokens(m, budget_knobs(m, frames, tpf), tpf) for m in ordered_methods()} == expected


def test_video_tokens_follow_the_other_knobs():
    assert video_tokens("mukv", {}, 196) == 8212  # the defaults: the published numbers
    assert video_tokens("mukv", {"keep_floor": "one"}, 16) == 20 * 1 + 32 * 1 + 12 * 51
    assert video_tokens("mukv", {"top_k": [1, 1], "granularities": [1.0, 2.0], "keep_ratio": [0.5, 1.0]}, 16) == 40
    assert video_tokens("rekv", {"retrieve_size": 8, "retrieve_chunk_size": 4}, 16) == 128
    assert video_tokens("sliding_window", {"n_local": 100}, 16) == 100


@pytest.mark.parametrize("tpf", [16, 196])
@pytest.mark.parametrize("tokens", [64, 100, 256, 3000, 8212])
def test_budget_tokens_takes_the_largest_frame_budget_that_fits(tokens, tpf):
    for method in ordered_methods():
        smallest = video_tokens(method, budget_knobs(method, 1, tpf), tpf)
        if smallest is not None and tokens < smallest:  # below one frame's budget: refused
            with pytest.raises(ConfigError, match="budget_tokens"):
                budget_knobs_for_tokens(method, tokens, tpf)
            continue
        frames, knobs = budget_frames_for_tokens(method, tokens, tpf)
        assert knobs == budget_knobs_for_tokens(method, tokens, tpf)
        if method in ("full", *PRESSES):  # no budget: keeps everything / a share of every block
            assert (frames, knobs) == (None, {})
            continue
        assert knobs == budget_knobs(method, frames, tpf)
        held, more = video_tokens(method, knobs, tpf), video_tokens(method, budget_knobs(method, frames + 1, tpf), tpf)
        # the largest budget that fits; where contexts stop growing (a floor or a cap), the smallest reaching it
        fewer = video_tokens(method, budget_knobs(method, frames - 1, tpf), tpf) if frames > 1 else -1
        assert held <= tokens and (tokens < more or (more == held and fewer < held)), (method, tokens, tpf)
    assert budget_knobs_for_tokens("mukv", 8212, 196) == {"top_k": [20, 32, 12]}  # the published point exactly
    assert budget_knobs_for_tokens("rekv", 100, 16) == {"retrieve_size": 6}  # 96 tokens: whole frames
    assert budget_knobs_for_tokens("sliding_window", 100, 16) == {"n_local": 96}


def test_budget_tokens_below_the_smallest_budget_or_without_video_tokens_is_refused(monkeypatch):
    with pytest.raises(ConfigError, match=r"budget_tokens.*'mukv': 56 video tokens at 1 frame"):
        budget_knobs_for_tokens("mukv", 20, 16)
    with pytest.raises(ConfigError, match="budget_tokens"):
        budget_knobs_for_tokens("uniform", 15, 16)
    # a method with budget_knobs but no video_tokens: frame budgets work, token budgets say what is missing
    monkeypatch.setattr(CACHE_METHODS["rekv"], "video_tokens", classmethod(CacheMethod.video_tokens.__func__))
    assert budget_knobs("rekv", 4, 16) == {"retrieve_size": 4} and video_tokens("rekv", {}, 16) is None
    with pytest.raises(ConfigError, match="budget_tokens.*must implement video_tokens|budget_tokens.*video_tokens"):
        budget_knobs_for_tokens("rekv", 256, 16)


def test_budget_tokens_writes_the_knobs_and_excludes_budget_frames():
    cfg = compose_cfg("cache=mukv", "budget_tokens=256")
    assert apply_budget(cfg, 16) == {"top_k": [8, 12, 4]} and list(cfg.cache.top_k) == [8, 12, 4]  # 248 tokens
    # the run's own knobs count: 8 x 4 + 13 x 1 + 5 x 51 = 300 tokens, with keep_floor=one 9 x 1 + 14 x 1 + 5 x 51 = 278
    assert apply_budget(compose_cfg("cache=mukv", "budget_tokens=300"), 16) == {"top_k": [8, 13, 5]}
    trimmed = compose_cfg("cache=mukv", "budget_tokens=300", "cache.keep_floor=one")
    assert apply_budget(trimmed, 16) == {"top_k": [9, 14, 5]}
    assert apply_budget(compose_cfg("cache=full", "budget_tokens=64"), 16) == {}
    smoke = ("experiment=smoke", "model=nano")
    with pytest.raises(ConfigError, match="budget_tokens.*not both"):
        validate_config(compose_cfg(*smoke, "budget_tokens=256", "budget_frames=16"))
    with pytest.raises(ConfigError, match="budget_tokens"):
        validate_config(compose_cfg(*smoke, "budget_tokens=0"))
    with pytest.raises(ConfigError, match="budget_tokens.*56 video tokens"):
        apply_budget(compose_cfg("cache=mukv", "budget_tokens=20"), 16)


@pytest.mark.parametrize("budget", ["budget_tokens=100", "budget_frames=5"])
def test_video_tokens_is_what_the_answer_attends_to(tmp_path, budget):
    """The nano model on one short stream per method: the largest answer context, less the init prompt, is the
    method's video_tokens (recorded as budget_video_tokens), and with budget_tokens it is within the budget."""
    import pandas as pd

    n_init = None  # the init prompt's tokens: from the full cache (first: ordered_methods), which holds every frame
    with_budget = [m for m in ordered_methods() if m == "full" or budget_knobs(m, 1, 16)]  # the presses have none
    assert "infinipot_v" in with_budget and "knorm" not in with_budget
    for option in [*with_budget, "mukv_keep_floor_one"]:
        cfg = compose_cfg("experiment=smoke", "model=nano", f"cache={option}", budget, "engine.max_new_tokens=1",
                          "dataset.synthetic.duration_s=60", "dataset.synthetic.questions_per_video=3",
                          "dataset.synthetic.seed=3")
        folder = tmp_path / option
        cfg.paths.output_dir = str(folder)
        result = train_eval(cfg, folder)
        rows = pd.read_csv(folder / "predictions.csv")
        if option == "full":
            n_init = int((rows.online_tokens - 16 * rows.frames_seen).iloc[0])
        measured = int(rows.online_tokens.max()) - n_init
        expected = result.metrics["budget_video_tokens"]
        if option == "full":
            assert n_init == 11 and expected is None and result.metrics["budget_knobs"] == {}
            continue
        exact = getattr(CACHE_METHODS.get(option), "video_tokens_exact", True)  # StreamKV's is a bound
        assert (expected == measured) if exact else (0 < measured <= expected), (option, budget, result.metrics["budget_knobs"], rows.online_tokens.tolist())
        if budget == "budget_tokens=100":
            assert result.metrics["budget_tokens"] == 100 and measured <= 100
