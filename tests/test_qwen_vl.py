"""Qwen2.5-VL and Qwen3-VL: the adapter against the stock transformers models (tiny, random weights)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ArrayFrames, compose_cfg
from test_engine import stream

from mukv.cache import FullCache, ReKVCache, ordered_methods
from mukv.config import register_configs
from mukv.data.types import VideoSample
from mukv.engine import EngineSettings, StreamingEngine
from mukv.errors import ConfigError
from mukv.models.qwen_vl import QwenTinyModel, build_qwen_tiny, frame_patches, released_config
from mukv.report.evidence import evidence_recalled
from mukv.train_eval import train_eval

register_configs()

FAMILIES = {"qwen2_5_vl": (112, 112), "qwen3_vl": (128, 96)}  # Qwen3-VL: a grid of 4 x 3 tokens (not square)


@pytest.fixture(scope="module", params=list(FAMILIES))
def qwen(request):
    return build_qwen_tiny(request.param, FAMILIES[request.param], 0, torch.device("cpu"), torch.float32)


def frames_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (n, 100, 120, 3)).astype(np.uint8)


def layout(llm, n_init: int, steps: int, n_text: int) -> torch.Tensor:
    """(3, 1, L) positions of init text, ``steps`` frames and ``n_text`` text tokens by the adapter's rule: text
    at (p, p, p), the token in row r, column c of a frame starting at b at (b, b + r, b + c)."""
    n, (rows, cols) = llm.geometry.tokens_per_frame, llm.geometry.grid
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    parts = [torch.arange(n_init).expand(3, -1)]
    for k in range(steps):
        b = n_init + k * n
        parts.append(torch.stack((torch.full((n,), b), b + r.flatten(), b + c.flatten())))
    end = n_init + steps * n
    parts.append(torch.arange(end, end + n_text).expand(3, -1))
    return torch.cat(parts, dim=1)[:, None]


def stock_logits(llm, frames: np.ndarray, question: str, positions: torch.Tensor | None = None) -> torch.Tensor:
    """One forward of the stock model: input ids with the video placeholders, the pixel patches and grid, the
    stock vision tower (and deepstack), rotary embedding and attention; positions by the adapter's rule."""
    init, prompt = llm.init_prompt_ids(), llm.question_prompt_ids(question)
    steps, n = len(frames) // 2, llm.geometry.tokens_per_frame
    ids = torch.tensor([init + [llm.model.config.video_token_id] * (n * steps) + prompt])
    pixels, grid = llm.vision_inputs(frames)
    if positions is None:
        positions = layout(llm, len(init), steps, len(prompt))
    with torch.no_grad():
        out = llm.model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, position_ids=positions)
    return out.logits[0, -1].float()


@pytest.mark.parametrize("chunk", [2, 4, 8])
def test_streamed_full_equals_one_stock_forward(qwen, chunk):
    frames = frames_of(8)
    answer, context, _ = stream(qwen, FullCache(query_block=40), frames, chunk).answer("what colour was the star?")
    torch.testing.assert_close(answer.first_token_logits, stock_logits(qwen, frames, "what colour was the star?"),
                               atol=1e-5, rtol=1e-5)
    assert context.online_tokens == len(qwen.init_prompt_ids()) + 4 * qwen.geometry.tokens_per_frame


def test_the_comparison_can_fail(qwen):
    """One changed frame, or 1-D positions for the frames, change the stock logits beyond the tolerance."""
    frames = frames_of(4)
    ours = stream(qwen, FullCache(), frames, 4).answer("q")[0].first_token_logits
    other = frames.copy()
    other[3] = 255 - other[3]
    assert (ours - stock_logits(qwen, other, "q")).abs().max() > 1e-4
    n = len(qwen.init_prompt_ids()) + 2 * qwen.geometry.tokens_per_frame + len(qwen.question_prompt_ids("q"))
    flat = torch.arange(n).expand(3, -1)[:, None]
    assert (ours - stock_logits(qwen, frames, "q", positions=flat)).abs().max() > 1e-4


def test_deepstack_features_reach_the_language_model():
    """Qwen3-VL adds vision features to the first layers' hidden states: they travel packed with each token, and
    zeroing them changes the answer."""
    llm = build_qwen_tiny("qwen3_vl", (128, 128), 0, torch.device("cpu"), torch.float32)
    assert llm.deepstack == 2
    visual = llm.encode_frames(frames_of(2))

    def first_logits(tokens):
        method = FullCache()
        engine = StreamingEngine(llm, method, EngineSettings(max_new_tokens=1, progress=False))
        method.start_video(llm.init_prompt_ids())
        method.ingest(tokens, 0)
        return engine.answer("q")[0].first_token_logits

    flat = visual.clone()
    flat[..., llm.hidden + 3:] = 0
    assert (first_logits(visual) - first_logits(flat)).abs().max() > 1e-4


def test_a_frame_is_laid_out_as_the_stock_model_lays_out_one_frame(qwen):
    """The rule (b, b + r, b + c) is what the stock model gives one frame (grid_t 1) starting at b."""
    b, (rows, cols), merge = 37, qwen.geometry.grid, qwen.merge
    grid = torch.tensor([1, rows * merge, cols * merge])
    stock = qwen.model.model.get_vision_position_ids(b, grid, 1, merge, 1)
    ours = layout(qwen, b, 1, 0)[:, 0, b:]
    assert torch.equal(stock, ours)
    # and the adapter's offsets give it from the 1-D positions b .. b + N - 1 the cache methods assign
    frame = qwen.encode_frames(frames_of(2))
    p = b + torch.arange(qwen.geometry.tokens_per_frame)
    torch.testing.assert_close(qwen.rope_offsets(frame[0])[:, :] + p, ours.float())


def test_rekv_retrieving_everything_answers_as_full(qwen):
    frames = frames_of(8)
    full = stream(qwen, FullCache(), frames, 4).answer("what colour was the star?")[0]
    rekv, context, _ = stream(qwen, ReKVCache(n_local=100_000, retrieve_size=64), frames, 4).answer(
        "what colour was the star?")
    torch.testing.assert_close(rekv.first_token_logits, full.first_token_logits, atol=1e-5, rtol=1e-5)
    assert context.detail.blocks == list(range(4))  # four steps of two frames


def test_patches_are_laid_out_as_the_checkpoint_processor_lays_them_out():
    """One frame twice (a still image) through ``frame_patches`` equals transformers' Qwen2-VL image processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = frames_of(1)[0]
    processor = Qwen2VLImageProcessorPil()
    ref = processor(images=[frame], return_tensors="pt", size={"shortest_edge": 112 * 112, "longest_edge": 112 * 112})
    assert ref.image_grid_thw.tolist() == [[1, 8, 8]]
    ours = frame_patches(np.stack([frame, frame]), (112, 112), processor.image_mean, processor.image_std, 14, 2, 2)
    torch.testing.assert_close(ours, ref.pixel_values, atol=1e-6, rtol=0)


def test_the_engine_streams_whole_steps_and_counts_recall_in_video_frames(qwen):
    """Two frames per step: an odd last frame waits for its pair; the method counts steps."""
    frames = frames_of(7)
    method = FullCache()
    engine = StreamingEngine(qwen, method, EngineSettings(encode_chunk_size=4, max_new_tokens=1, progress=False))
    method.start_video(qwen.init_prompt_ids())
    engine._peak_kv = 0
    done = engine.encode_until(VideoSample("v", 7, [], ArrayFrames(frames)), 0, 7, None)
    assert done == 6 and method.frames_seen == 3
    meta = {"evidence_cells": [[5, 0]], "grid": 4}
    assert evidence_recalled(meta, None, 16, frames=[2], frames_per_step=2) == 1.0
    assert evidence_recalled(meta, None, 16, frames=[1], frames_per_step=2) == 0.0
    with pytest.raises(ConfigError, match="engine.encode_chunk_size"):
        StreamingEngine(qwen, FullCache(), EngineSettings(encode_chunk_size=3, progress=False))


def test_bad_frame_sizes_fail_before_the_model_loads():
    cfg = compose_cfg("model=qwen2_5_vl_tiny", "model.frame_size=[100,112]")
    with pytest.raises(ConfigError, match="model.frame_size"):
        QwenTinyModel.geometry(cfg.model)
    cfg = compose_cfg("model=qwen3_vl_tiny", "model.frame_size=[112,112]")  # 112 is not a multiple of 32
    with pytest.raises(ConfigError, match="model.frame_size"):
        QwenTinyModel.geometry(cfg.model)
    assert QwenTinyModel.geometry(compose_cfg("model=qwen3_vl_tiny").model).tokens_per_frame == 16


def test_released_dimensions_give_the_geometry_of_the_checkpoints():
    from mukv.models.qwen_vl import qwen_geometry

    g = qwen_geometry(released_config("qwen2.5-vl-3b"), torch.bfloat16, (448, 448))
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.tokens_per_frame, g.frames_per_step) == (36, 2, 128, 256, 2)
    g = qwen_geometry(released_config("qwen3-vl-8b"), torch.bfloat16, (448, 448))
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.tokens_per_frame) == (36, 8, 128, 196)


@pytest.mark.parametrize("model", ["qwen2_5_vl_tiny", "qwen3_vl_tiny"])
def test_every_method_runs_on_qwen(model, tmp_path):
    """Every registered method through the entry point, no method-specific code for the model."""
    for name in ordered_methods():
        cfg = compose_cfg("experiment=smoke", f"model={model}", f"cache={name}", "engine.max_new_tokens=2",
                          "engine.encode_chunk_size=8", "dataset.synthetic.duration_s=24")
        out = tmp_path / name
        cfg.paths.output_dir = str(out)
        train_eval(cfg, out)
        rows = pd.read_csv(out / "predictions.csv")
        assert len(rows) == 2 and rows.error.isna().all(), name


@pytest.mark.parametrize("option,hub_id", [("qwen2_5_vl_3b", "Qwen/Qwen2.5-VL-3B-Instruct"),
                                           ("qwen2_5_vl_7b", "Qwen/Qwen2.5-VL-7B-Instruct"),
                                           ("qwen3_vl_2b", "Qwen/Qwen3-VL-2B-Instruct"),
                                           ("qwen3_vl_4b", "Qwen/Qwen3-VL-4B-Instruct"),
                                           ("qwen3_vl_8b", "Qwen/Qwen3-VL-8B-Instruct")])
def test_the_real_weight_configs_name_their_checkpoints(option, hub_id):
    m = compose_cfg(f"model={option}").model
    assert (m.path, m._target_, list(m.frame_size)) == (hub_id, "mukv.models.qwen_vl.QwenPretrainedModel", [448, 448])


def layer0_keys(llm, visual: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Layer 0's keys of packed visual tokens (1, L, packed) rotated to 3-D ``positions`` (3, 1, L) by the
    stock model's own projections, norm and rotary embedding (nothing of the adapter's position rule)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    lm = llm.language_model
    layer = lm.layers[0]
    x = layer.input_layernorm(llm.token_features(visual))
    attn = layer.self_attn
    k = attn.k_proj(x).view(1, x.shape[1], -1, llm.geometry.head_dim)
    if hasattr(attn, "k_norm"):  # Qwen3-VL
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    cos, sin = lm.rotary_emb(x, positions)
    return apply_rotary_pos_emb(k, k, cos, sin)[1]


@pytest.mark.parametrize("method", ["rekv", "sliding_window"])
def test_moved_frames_sit_where_the_rule_says_by_the_models_own_rotary(qwen, method):
    """ReKV retrieving two of six steps, and the sliding window holding the last two, put those frames at
    contiguous positions: the answer context's layer-0 keys equal the stock rotary embedding at
    (b', b' + r, b' + c) for each frame's new start b' (the time re-indexed, the grid moved with it)."""
    from mukv.cache import SlidingWindowCache

    frames = frames_of(12)
    n, n_init = qwen.geometry.tokens_per_frame, len(qwen.init_prompt_ids())
    cache = ReKVCache(n_local=2 * n, retrieve_size=2) if method == "rekv" else SlidingWindowCache(n_local=2 * n)
    context = stream(qwen, cache, frames, 4).answer("what colour was the star?")[1]
    kept = context.detail.blocks if method == "rekv" else [4, 5]
    assert len(kept) == 2 and context.keys[0].shape[-2] == n_init + 2 * n
    visual = qwen.encode_frames(frames).reshape(1, -1, qwen.packed_width)
    tokens = torch.cat([visual[:, k * n:(k + 1) * n] for k in kept], dim=1)
    expected = layer0_keys(qwen, tokens, layout(qwen, n_init, 2, 0)[:, :, n_init:])
    torch.testing.assert_close(context.keys[0][..., n_init:, :], expected, atol=1e-5, rtol=1e-5)
    # the same keys at 1-D positions (the rule dropped) are far from it
    flat = torch.arange(n_init, n_init + 2 * n).expand(3, 1, -1)
    assert (context.keys[0][..., n_init:, :] - layer0_keys(qwen, tokens, flat)).abs().max() > 1e-3


def test_a_checkpoint_folder_loads_through_the_real_loader(tmp_path):
    """``model=qwen2_5_vl_3b model.path=<folder>``: config, tokenizer, the processor's statistics and the weights
    from a folder (a tiny checkpoint written here), through the loader real checkpoints take; the loaded model
    answers as the one that was saved."""
    import json

    from mukv.models.qwen_vl import QwenPretrainedModel

    built = build_qwen_tiny("qwen2_5_vl", (112, 112), 0, torch.device("cpu"), torch.float32)
    built.model.save_pretrained(tmp_path)
    built.tokenizer.save_pretrained(tmp_path)
    stats = {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(stats))
    m = compose_cfg("model=qwen2_5_vl_3b", f"model.path={tmp_path}", "model.frame_size=[112,112]",
                    "model.device=cpu", "model.dtype=float32").model
    assert QwenPretrainedModel.geometry(m).tokens_per_frame == 16
    loaded = QwenPretrainedModel.load(m)
    assert (loaded.image_mean, loaded.image_std) == (tuple(stats["image_mean"]), tuple(stats["image_std"]))
    built.image_mean, built.image_std = loaded.image_mean, loaded.image_std
    frames = frames_of(4)
    ours = stream(loaded, FullCache(), frames, 4).answer("q")[0].first_token_logits
    torch.testing.assert_close(ours, stream(built, FullCache(), frames, 4).answer("q")[0].first_token_logits)
    with pytest.raises(ConfigError, match="model.path"):
        QwenPretrainedModel.geometry(compose_cfg("model=qwen2_5_vl_3b", f"model.path={tmp_path / 'nope'}").model)


@pytest.mark.parametrize("published", [True, False], ids=["published", "exact"])
def test_sliding_window_equals_the_masked_reference_forward(qwen, published):
    """The whole Qwen model under sliding_window equals one forward of it whose attention is the direct masked
    reference of the LLaVA-OV test (test_engine), q and k rotated by the model's own rotary embedding at the
    tokens' 3-D offsets; and the answer attends to init + the window re-rotated."""
    from test_engine import reference_sink_window

    from mukv.cache import SlidingWindowCache

    frames = frames_of(8)
    t = qwen.geometry.tokens_per_frame
    n_local = 2 * t + 5
    options = {} if published else {"sink_distance": "n_local", "sink_handover": "exact"}
    sinks = {"sink_distance": n_local - 1, "block": t} if published else {}
    method = SlidingWindowCache(n_local=n_local, query_block=11, **options)
    stream(qwen, method, frames, 4)
    n_init = len(qwen.init_prompt_ids())
    emb = torch.cat([qwen.embed_ids(qwen.init_prompt_ids()), qwen.encode_frames(frames).reshape(1, -1, qwen.packed_width)], 1)
    captured = {}

    def reference(idx, q, k, v, scaling):
        captured[idx] = k
        return reference_sink_window(q, k, v, n_local, n_init, qwen.rope, scaling, **sinks).to(q.dtype)

    qwen.forward(emb, reference)
    for idx, layer in enumerate(method.layers):
        torch.testing.assert_close(layer.k, captured[idx][..., -n_local:, :], atol=1e-4, rtol=1e-4)
    context = method.recall("q")
    expected = qwen.rope.rotate_range(torch.cat([captured[0][..., :n_init, :], captured[0][..., -n_local:, :]], -2), 0)
    torch.testing.assert_close(context.keys[0], expected, atol=1e-4, rtol=1e-4)
