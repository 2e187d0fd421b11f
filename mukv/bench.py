"""``make bench``: speed and memory of the cache methods on one stream, as ratios measured in one run.

The real LLaVA-OneVision-0.5B architecture is built from its config dimensions with random weights (no
download: speed and memory do not depend on weight values); the tiny model serves long streams. For each
method: encode frames per second (vision tower and LLM separately), time to first answer token and to a
fixed-length answer, stored KV bytes per frame and per hour, peak RSS, and the time per encode chunk as
the stream grows. The machine's matmul throughput is measured in the same run, and achieved FLOP/s are
reported against it. ``--device cuda`` runs it all on a GPU (timings synchronise the device; peak GPU
memory is reported per method).

``--growth`` streams up to two hours of video at 0.5 fps (3,600 frames) with a small model (``--model nano``
or ``tiny``) and records, chunk by chunk, the time per frame, the work per frame counted where it is done
(LLM tokens and attention query-key pairs, :class:`mukv.cache.attention.OpCounter`), stored and device KV
bytes and RSS, plus answer latency at checkpoints: ``growth.csv``, ``growth.json`` and ``growth.png``.

Methods are built as a run builds them: ``conf/cache/<option>.yaml`` composed with Hydra overrides, then
``train_eval.apply_budget`` (``budget_frames=``) and ``train_eval.build_method``. The default list is the
registry's (``mukv.cache.ordered_methods``), so a new method is timed by existing. Window methods get ReKV's
published 15,000-token window scaled to the model's tokens per frame. Overrides after an option are for that
option alone (``--methods rekv mukv mukv cache.share_prefixes=false``: three rows); after ``--``, for every
method.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import LlavaOnevisionForConditionalGeneration

from mukv.cache import ordered_methods
from mukv.cache.base import CacheMethod
from mukv.cache.instrumentation import CallCount, OpCounter, count_calls, plain_forward_calls
from mukv.config import CompileMode
from mukv.engine import EngineSettings, StreamingEngine, peak_rss_bytes
from mukv.errors import MukvError
from mukv.models.adapter import VideoLLM
from mukv.models.loading import build_tiny, fast_bf16, llava_ov_config, use_stream_attention
from mukv.models.tokenizer import build_byte_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
CONF = Path(__file__).resolve().parents[1] / "conf"


def random_llava_ov(size: str, dtype: torch.dtype, device: str = "cpu") -> VideoLLM:
    """The real architecture with N(0, 0.02) weights (fast to make; values do not change the speed)."""
    config = llava_ov_config(size)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration(config)
    model = model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    use_stream_attention(model)
    return VideoLLM(model, build_byte_tokenizer(), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), name=f"llava-ov-{size}-random")


def narrow_llava_ov(size: str, head_dim: int = 8, device: str = "cpu", dtype: torch.dtype = torch.float32) -> VideoLLM:
    """The LLaVA-OV layout (text layers, query and KV heads, tokens per frame, vocabulary) with ``head_dim``-wide
    heads, a narrow MLP and a one-layer vision tower: operator calls do not depend on widths (tested), so
    ``--ops`` counts the real architecture's calls in seconds instead of hours."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    full = llava_ov_config(size)
    t, v = full.text_config, full.vision_config
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=v.image_size, patch_size=v.patch_size)
    text = Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.num_attention_heads * head_dim, intermediate_size=64,
                       num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                       num_key_value_heads=t.num_key_value_heads, tie_word_embeddings=True)
    config = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    model = model.to(dtype)
    use_stream_attention(model)
    return VideoLLM(model, build_byte_tokenizer(), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), name=f"llava-ov-{size}-narrow")


# Qwen-VL architectures: the released dimensions, and the tiny ones (the tests)
QWEN_MODELS = ("qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b", "qwen2.5-vl-tiny",
               "qwen3-vl-tiny")


def random_qwen(name: str, dtype: torch.dtype, device: str, frame_size: Sequence[int]) -> VideoLLM:
    """A Qwen-VL architecture with N(0, 0.02) weights (the tiny ones: as the tests build them)."""
    from mukv.models.qwen_vl import QwenVLVideoLLM, build_qwen_tiny, build_qwen_tokenizer, released_config

    if name.endswith("-tiny"):
        family = "qwen2_5_vl" if name.startswith("qwen2.5") else "qwen3_vl"
        size = (112, 112) if family == "qwen2_5_vl" else (128, 128)
        return build_qwen_tiny(family, size, 0, torch.device(device), dtype)
    config = released_config(name)
    torch.manual_seed(0)
    from transformers import AutoModelForImageTextToText

    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config)
    model = model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    use_stream_attention(model)
    return QwenVLVideoLLM(model, build_qwen_tokenizer(), frame_size, name=f"{name}-random")


def sync(device: torch.device | str) -> None:
    """Wait for queued device work, so that wall-clock readings cover it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 8, device: torch.device | str = "cpu") -> float:
    """Measured square-matmul throughput of this machine: the roofline the methods are compared against."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def frame_flops(llm: VideoLLM) -> dict[str, float]:
    """Matmul FLOPs per video frame: the vision tower over its patches, the LLM prefill over the frame's tokens
    (projections and MLP; attention scores excluded, they depend on the method's context). Qwen-VL embeds two
    frames per step: a step's FLOPs are halved."""
    v, t, g = llm.config.vision_config, llm.config.text_config, llm.geometry
    head_dim = g.head_dim
    qkvo = 2 * t.hidden_size * t.num_attention_heads * head_dim + 2 * t.hidden_size * t.num_key_value_heads * head_dim
    llm_f = 2 * g.tokens_per_frame * t.num_hidden_layers * (qkvo + 3 * t.hidden_size * t.intermediate_size)
    if getattr(v, "image_size", None):  # LLaVA-OV: SigLIP over a square image, then the projector
        patches = (v.image_size // v.patch_size) ** 2
        vision = 2 * patches * v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
        projector = 2 * patches * (v.hidden_size * t.hidden_size + t.hidden_size**2)
    else:  # Qwen-VL: patches of two frames, gated (2.5) or plain (3) MLPs, then the 2x2 patch merger
        patches = g.tokens_per_frame * v.spatial_merge_size**2
        mlp = 3 if getattr(v, "fullatt_block_indexes", None) is not None else 2
        vision = 2 * patches * v.depth * (4 * v.hidden_size**2 + mlp * v.hidden_size * v.intermediate_size)
        merged = v.hidden_size * v.spatial_merge_size**2
        projector = 2 * g.tokens_per_frame * merged * (merged + v.out_hidden_size)
    return {k: float(x) / g.frames_per_step for k, x in (("vision", vision + projector), ("llm", llm_f))}


def plain_prefill_s_per_frame(llm: VideoLLM, frames: int, repeats: int = 3) -> float:
    """Seconds per frame of one causal forward of the language model over ``frames`` frames' visual tokens,
    with no history and no cache method (transformers' own SDPA path): what the architecture itself costs
    at this chunk size, the ceiling any method's encoding is measured against."""
    lm = llm.model.model.language_model
    steps = frames // llm.geometry.frames_per_step
    x = torch.randn(1, steps * llm.geometry.tokens_per_frame, llm.geometry.hidden_size, device=llm.device,
                    dtype=llm.dtype)
    with torch.inference_mode():
        lm(inputs_embeds=x, use_cache=False)
        sync(llm.device)
        t = time.perf_counter()
        for _ in range(repeats):
            lm(inputs_embeds=x, use_cache=False)
        sync(llm.device)
    return (time.perf_counter() - t) / repeats / frames


QUESTION = "What happened just before the person opened the door?"  # the one question every bench answers


class _Frames:
    """Random frames at the model's own frame size (no resize in the timings)."""

    def __init__(self, n: int, llm: VideoLLM, fps: float) -> None:
        self.n, self.sample_fps = n, fps
        self.shape = tuple(getattr(llm, "frame_size", None) or (llm.image_size, llm.image_size))
        self.rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return self.n

    def frames(self, a: int, b: int) -> np.ndarray:
        return self.rng.integers(0, 256, (b - a, *self.shape, 3), dtype=np.uint8)


def bench_method(llm: VideoLLM, method: CacheMethod, frames: int, chunk: int, new_tokens: int,
                 profile_dir: Path | None = None) -> dict[str, Any]:
    """Stream ``frames`` random frames, then answer one question with exactly ``new_tokens`` tokens.
    ``profile_dir``: afterwards, profile one more chunk and one more answer (see :func:`profile_step`)."""
    engine = StreamingEngine(llm, method, EngineSettings(encode_chunk_size=chunk, max_new_tokens=new_tokens,
                                                         progress=False))
    eos = llm.eos_token_ids
    llm.eos_token_ids = set()  # a fixed answer length, whatever random weights emit
    try:
        source = _Frames(frames, llm, 0.5)
        if llm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        method.start_video(llm.init_prompt_ids())
        engine._peak_kv = 0
        vision_s = llm_s = 0.0
        chunk_s = []
        for first in range(0, frames, chunk):
            pixels = source.frames(first, min(frames, first + chunk))
            t0 = time.perf_counter()
            visual = llm.encode_frames(pixels)
            sync(llm.device)
            t1 = time.perf_counter()
            method.ingest(visual, first // llm.geometry.frames_per_step)
            sync(llm.device)
            t2 = time.perf_counter()
            vision_s, llm_s = vision_s + t1 - t0, llm_s + t2 - t1
            chunk_s.append((t2 - t0) / len(pixels))
        answer, context, recall_s = engine.answer(QUESTION)
        stats = method.stats()
        if profile_dir is not None:
            pixels = source.frames(frames, frames + chunk)
            visual = llm.encode_frames(pixels)
            profile_step(lambda: method.ingest(visual, frames // llm.geometry.frames_per_step), llm.device, profile_dir / f"{file_slug(method.name)}_ingest")
            profile_step(lambda: engine.answer(QUESTION), llm.device,
                         profile_dir / f"{file_slug(method.name)}_answer")
    finally:
        llm.eos_token_ids = eos
    per_frame = stats.kv_bytes / frames
    return {
        "method": method.name, "frames": frames, "encode_fps": frames / (vision_s + llm_s),
        "vision_s_per_frame": vision_s / frames, "llm_s_per_frame": llm_s / frames,
        "s_per_frame_first_chunk": chunk_s[0], "s_per_frame_last_chunk": chunk_s[-1],
        "ttft_s": recall_s + answer.prefill_s, "latency_s": recall_s + answer.prefill_s + answer.decode_s,
        "online_tokens": context.online_tokens, "kv_bytes_per_frame": per_frame,
        "kv_gb_per_hour_0.5fps": per_frame * 0.5 * 3600 / 1e9, "peak_rss_gb": peak_rss_bytes() / 1e9,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if llm.device.type == "cuda" else None,
    }


def profile_step(step, device: torch.device, stem: Path, top: int = 30) -> dict[str, Any]:
    """Run ``step`` once under torch's profiler and write where its time went: ``stem.txt`` holds the ops
    ranked by device time (self) and by host time (self), and the summary line; ``stem.json`` the summary.
    On CUDA the summary sets the wall time against the summed kernel time (busy < 1: the host sets the pace)
    and counts the host-device synchronisations, by the Python line that caused them."""
    import warnings
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    stem.parent.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    syncs: Counter[str] = Counter()
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=activities) as prof:
                t = time.perf_counter()
                step()
                sync(device)
                wall = time.perf_counter() - t
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            syncs[f"{Path(w.filename).name}:{w.lineno}"] += 1
    events = prof.key_averages()
    kernel_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    summary = {"wall_s": wall, "kernel_s": kernel_us / 1e6, "device_busy": kernel_us / 1e6 / wall if cuda else None,
               "ops": int(sum(e.count for e in events)), "syncs": sum(syncs.values()), "sync_sites": dict(syncs.most_common(12))}
    text = [json.dumps(summary)]
    for key in (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        try:
            text.append(events.table(sort_by=key, row_limit=top, max_name_column_width=60))
        except Exception as e:  # the sort key's name moved between torch versions
            text.append(f"({key}: {e})")
    stem.with_suffix(".txt").write_text("\n\n".join(text))
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"profile {stem.name}: {json.dumps(summary)}", flush=True)
    return summary


def steady_frames(method: CacheMethod, tokens_per_frame: int, chunk: int) -> int:
    """Frames streamed before the counted chunk, in whole chunks: at least two chunks, and past the encoding
    window (``n_local``, where the method encodes with one) and the answer budget (``video_tokens``)."""
    import dataclasses

    knobs = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)} if dataclasses.is_dataclass(method) else {}
    window = knobs.get("n_local") if knobs.get("block_context", "shared") == "shared" else None
    budget = type(method).video_tokens(knobs, tokens_per_frame) if knobs else None
    tokens = max([0] + [int(n) for n in (window, budget) if isinstance(n, int)])
    need = max(2 * chunk, -(-tokens // tokens_per_frame) + chunk)
    return -(-need // chunk) * chunk


@contextlib.contextmanager
def steady_state(llm: VideoLLM, method: CacheMethod, chunk: int, frames: int | None = None):
    """``method`` (bound to ``llm``) streamed ``frames`` frames (default ``steady_frames``) of random visual
    tokens in ``chunk``-frame chunks, under the counting settings (one thread, ``count_calls``; the block stores
    on their device path); yields (the next chunk's visual tokens, its first frame, the frames streamed), in
    inference mode, and restores the settings after. Random embeddings: the vision tower is every method's."""
    g = llm.geometry
    frames = steady_frames(method, g.tokens_per_frame, chunk) if frames is None else frames
    steps, gen = chunk // g.frames_per_step, torch.Generator().manual_seed(0)

    def visual() -> torch.Tensor:  # packed as the model's visual tokens (Qwen-VL: side channels)
        return llm.visual_tokens(torch.randn(steps, g.tokens_per_frame, g.hidden_size, generator=gen).to(
            llm.device, llm.dtype))

    from mukv.cache.block_store import BlockStore

    staged, threads = BlockStore.stage_host_blocks, torch.get_num_threads()
    BlockStore.stage_host_blocks = True  # a CPU run takes the device path of the block stores (staged, flushed)
    torch.set_num_threads(1)  # counts independent of the machine (count_calls); compiled code sees one setting
    try:
        with torch.inference_mode():
            method.start_video(llm.init_prompt_ids())
            for first in range(0, frames, chunk):
                method.ingest(visual(), first // g.frames_per_step)
            yield visual(), frames // g.frames_per_step, frames
    finally:
        BlockStore.stage_host_blocks = staged
        torch.set_num_threads(threads)


def ops_row(llm: VideoLLM, method: CacheMethod, chunk: int, frames: int | None = None) -> dict[str, Any]:
    """Operator calls and host reads of one steady-state chunk of ``chunk`` frames (``steady_state``) and of one
    decoded answer token, each against the stock transformers computation of the same tokens: a causal forward
    over the same (batch, tokens) as the method's forwards, and a decode step over a ``DynamicCache`` as long as
    the answer's context. ``ratio_one_forward``: against one plain forward of the chunk's tokens (a method that
    runs more tokens than the chunk, as MuKV does, is over 1 by that alone)."""
    g, lm = llm.geometry, llm.model.model.language_model
    engine = StreamingEngine(llm, method, EngineSettings(encode_chunk_size=chunk, max_new_tokens=4, progress=False))
    with steady_state(llm, method, chunk, frames) as (x, first, frames):
        sync(llm.device)
        t = time.perf_counter()
        step = count_calls(lambda: method.ingest(x, first), llm.device)
        sync(llm.device)
        chunk_s = time.perf_counter() - t
        decode, decode_s, context_tokens = _decode_calls(llm, engine)
        with _eager():  # the references are the stock eager computation, compiled layers or not
            plain = plain_forward_calls(lm, step.forwards, g.hidden_size, llm.dtype, llm.device)
            one = plain_forward_calls(lm, [(1, chunk // g.frames_per_step * g.tokens_per_frame)], g.hidden_size,
                                      llm.dtype, llm.device)
            plain_decode, plain_decode_s = _plain_decode_calls(llm, context_tokens)
    return {"method": method.name, "frames_before": frames, "chunk_ops": step.ops, "plain_ops": plain,
            "ratio": step.ops / plain if plain else None, "ratio_one_forward": step.ops / one,
            "forwards": step.forwards, "host_reads": step.host_reads, "host_read_sites": dict(step.sites),
            "chunk_s": chunk_s, "decode_ops": decode.ops, "plain_decode_ops": plain_decode.ops,
            "decode_ratio": decode.ops / plain_decode.ops, "decode_host_reads": decode.host_reads,
            "decode_ms": decode_s * 1e3, "plain_decode_ms": plain_decode_s * 1e3, "context_tokens": context_tokens,
            "top_ops": dict(step.by_op.most_common(12))}


def _eager():
    """Compiled code set aside (``torch.compiler.set_stance("force_eager")``) where torch has it."""
    import contextlib

    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def _decode_calls(llm: VideoLLM, engine: StreamingEngine, tokens: int = 4) -> tuple[CallCount, float, int]:
    """The engine's decode step (``decode_attention``), counted on the second answer token after the prompt;
    time per token over ``tokens`` more."""
    from mukv.engine import decode_attention

    context = engine.method.recall(QUESTION)
    prompt = llm.question_prompt_ids(QUESTION)
    attend = decode_attention(context, llm, reserve=len(prompt) + tokens + 2)
    token = llm.logits(llm.forward(llm.embed_ids(prompt), attend)[:, -1])[0].argmax()

    def step() -> None:
        nonlocal token
        token = llm.logits(llm.forward(llm.embed_ids(token.view(1)), attend)[:, -1])[0].argmax()

    counted, seconds = _count_and_time(step, llm.device, tokens)
    return counted, seconds, context.online_tokens + len(prompt) + 2


def _count_and_time(step, device: torch.device, repeats: int) -> tuple[CallCount, float]:
    """One untimed ``step``, one counted (``count_calls``), then the mean time of ``repeats`` more."""
    step()
    counted = count_calls(step, device)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    return counted, (time.perf_counter() - t) / repeats


def _plain_decode_calls(llm: VideoLLM, length: int, tokens: int = 4) -> tuple[CallCount, float]:
    """transformers' own decode step (its SDPA attention and ``DynamicCache``) after ``length`` tokens: embed,
    forward, head, greedy pick, as one step of greedy generation."""
    import inspect

    from transformers import DynamicCache

    lm, g = llm.model.model.language_model, llm.geometry
    cache = DynamicCache(config=lm.config)
    # transformers >= 5.x renames past_key_values to cache (the old name warns): whichever this version takes
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    x = torch.randn(1, length, g.hidden_size, dtype=llm.dtype, device=llm.device)
    lm(inputs_embeds=x, use_cache=True, **{name: cache})
    token = torch.zeros((), dtype=torch.long, device=llm.device)

    def step() -> None:
        nonlocal token
        hidden = lm(inputs_embeds=lm.embed_tokens(token.view(1, 1)), use_cache=True, **{name: cache}).last_hidden_state
        token = llm.model.lm_head(hidden[:, -1]).float()[0].argmax()

    return _count_and_time(step, llm.device, tokens)


def ops_markdown(rows: list[dict[str, Any]], chunk: int) -> str:
    lines = [f"| method | forwards (batch x tokens) | ops per {chunk}-frame chunk | plain forward, same tokens | ratio "
             "| vs one chunk forward | host reads per chunk | ops per answer token | plain decode step | ratio "
             "| ms per token (plain) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fw = ", ".join(f"{b}x{n}" for b, n in r["forwards"]) or "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        lines.append(f"| {r['method']} | {fw} | {r['chunk_ops']:,} | {r['plain_ops']:,} | {ratio} | "
                     f"{r['ratio_one_forward']:.2f}x | {r['host_reads']} | {r['decode_ops']:,} | "
                     f"{r['plain_decode_ops']:,} | {r['decode_ratio']:.2f}x | {r['decode_ms']:.1f} "
                     f"({r['plain_decode_ms']:.1f}) |")
    return "\n".join(lines)


def run_ops(llm: VideoLLM, methods: list[CacheMethod], args) -> None:
    from tqdm.auto import tqdm

    rows = []
    for method in tqdm(methods, desc="operator calls", unit="method"):
        row = ops_row(llm, method, args.chunk)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("method", "chunk_ops", "plain_ops", "ratio", "host_reads",
                                              "decode_ops", "plain_decode_ops", "decode_ratio")}), flush=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": llm.name,
              "dtype": args.dtype, "device": _device_name(llm.device), "chunk": args.chunk,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    print(ops_markdown(rows, args.chunk))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


def growth_curve(llm: VideoLLM, method: CacheMethod, frames: int, chunk: int, answer_every: int,
                 progress: bool = True, vision: bool = True) -> list[dict[str, Any]]:
    """One row per encode chunk of a ``frames``-long stream; rows at multiples of ``answer_every`` frames
    also carry the time to answer one question (recall + 8 decoded tokens) and its context size.
    ``vision=False`` feeds random visual tokens of the right shape instead of running the vision tower (the
    same for every method): long LLM-side curves of the large architectures in reasonable time."""
    from tqdm.auto import tqdm

    engine = StreamingEngine(llm, method, EngineSettings(encode_chunk_size=chunk, max_new_tokens=8, progress=False))
    source = _Frames(frames, llm, 0.5)
    method.start_video(llm.init_prompt_ids())
    rows = []
    gen = torch.Generator().manual_seed(0)
    eos = llm.eos_token_ids
    llm.eos_token_ids = set()
    try:
        for first in tqdm(range(0, frames, chunk), desc=method.name, disable=not progress, leave=False):
            pixels = source.frames(first, min(frames, first + chunk))
            n = len(pixels)
            OpCounter.reset()
            t0 = time.perf_counter()
            if vision:
                visual = llm.encode_frames(pixels)
            else:
                shape = (n // llm.geometry.frames_per_step, llm.geometry.tokens_per_frame, llm.geometry.hidden_size)
                visual = llm.visual_tokens(torch.randn(shape, generator=gen, dtype=torch.float32).to(llm.device,
                                                                                                    llm.dtype))
            sync(llm.device)
            t1 = time.perf_counter()
            method.ingest(visual, first // llm.geometry.frames_per_step)
            sync(llm.device)
            t2 = time.perf_counter()
            stats = method.stats()
            row = {"method": method.name, "frames_seen": first + n, "video_min_at_0.5fps": (first + n) / 0.5 / 60,
                   "s_per_frame": (t2 - t0) / n, "llm_s_per_frame": (t2 - t1) / n,
                   "llm_tokens_per_frame": OpCounter.llm_tokens / n,
                   "attention_pairs_per_frame": OpCounter.attention_pairs / n,
                   "kv_bytes": stats.kv_bytes, "device_kv_bytes": stats.device_kv_bytes, "aux_bytes": stats.aux_bytes,
                   "rss_bytes": peak_rss_bytes(),
                   "gpu_bytes": torch.cuda.max_memory_allocated() if llm.device.type == "cuda" else None}
            if (first + n) % answer_every == 0 or first + n == frames:
                OpCounter.reset()
                answer, context, recall_s = engine.answer(QUESTION)
                row.update(ttft_s=recall_s + answer.prefill_s, latency_s=recall_s + answer.prefill_s + answer.decode_s,
                           online_tokens=context.online_tokens, answer_attention_pairs=OpCounter.attention_pairs)
            rows.append(row)
    finally:
        llm.eos_token_ids = eos
    return rows


def plot_growth(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Four panels against video length: time per frame, attention work per frame, stored KV, device KV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    panels = [("s_per_frame", "encode s / frame"), ("attention_pairs_per_frame", "attention pairs / frame"),
              ("kv_bytes", "stored KV (GB)"), ("device_kv_bytes", "device KV (MB)")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (col, label) in zip(axes, panels, strict=True):
        for name, g in df.groupby("method", sort=False):
            y = g[col] / (1e9 if col == "kv_bytes" else 1e6 if col == "device_kv_bytes" else 1)
            ax.plot(g["video_min_at_0.5fps"], y, label=name)
        ax.set_xlabel("video minutes at 0.5 fps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ReKV's published encoding window: 15,000 tokens at LLaVA-OV's 196 tokens per frame (76.5 frames). The
# methods whose answer context is that window (registered names; their conf/cache variants too) get it scaled
# to the model's tokens per frame; MuKV's n_local (its block_context=shared ablation) keeps its config value.
PUBLISHED_WINDOW_TOKENS, PUBLISHED_TOKENS_PER_FRAME = 15000, 196
WINDOW_METHODS = ("sliding_window", "rekv", "streamkv")


@dataclass(frozen=True)
class MethodSpec:
    """A method a benchmark runs: a ``conf/cache`` option and Hydra overrides for it alone. Its label (the
    row name) is what one would pass to ``python -m mukv.run``: ``mukv cache.share_prefixes=false``."""

    option: str
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return " ".join([self.option, *self.overrides])

    @property
    def slug(self) -> str:
        return file_slug(self.label)


def file_slug(label: str) -> str:
    """A method label as a file name: ``mukv cache.kv_quant=int8`` -> ``mukv+kv_quant=int8``."""
    return re.sub(r"[^A-Za-z0-9_.=+,\[\]-]+", "_", label.replace(" cache.", "+"))


def registered_name(cache_cfg: DictConfig) -> str:
    """The registered method behind a cache config (``conf/cache`` variants such as ``rekv_cosine`` are ReKV)."""
    from mukv.cache import CACHE_METHODS

    target = str(cache_cfg._target_)
    for name, cls in CACHE_METHODS.items():
        if f"{cls.__module__}.{cls.__qualname__}" == target:
            return name
    raise SystemExit(f"error: cache._target_ {target} is not a registered cache method")


def cache_options() -> list[str]:
    """Every ``conf/cache`` option (methods and their ablations, ``rekv_cosine`` ...)."""
    return sorted(p.stem for p in (CONF / "cache").glob("*.yaml"))


def parse_method_specs(items: Sequence[str]) -> list[MethodSpec]:
    """``--methods`` words: ``conf/cache`` options (comma- or space-separated), each optionally followed by Hydra
    overrides for it alone: ``full,rekv mukv mukv cache.kv_quant=int8`` is full, rekv, mukv and mukv with an
    int8 store (a word with ``=`` belongs to the option before it; ``"mukv cache.kv_quant=int8"`` quoted as one
    word is the same). An unknown option raises ``ValueError`` naming the options."""
    def is_override(word: str) -> bool:  # key=value, +key=value, ~key (not cache=<option>, not old name+knob=value)
        head = word.split(None, 1)[0].removeprefix("cache=") if word.strip() else ""
        key = head.partition("=")[0].lstrip("+~")
        return ("=" in head or head.startswith("~")) and "+" not in key

    specs: list[MethodSpec] = []
    # an argument that starts with an option may hold its overrides too (one quoted word); an override is whole
    for word in (w for item in items for w in ([item] if is_override(item) else shlex.split(item))):
        if is_override(word):  # an override of the option before it
            if not specs:
                raise ValueError(f"--methods: '{word}' must follow the cache option it is for")
            last = specs.pop()
            specs.append(MethodSpec(last.option, (*last.overrides, word)))
            continue
        for option in filter(None, (w.strip().removeprefix("cache=") for w in word.split(","))):
            if not (CONF / "cache" / f"{option}.yaml").is_file():
                name, *knobs = option.split("+")
                hint = (f" (knobs are Hydra overrides after the option: "
                        f"{' '.join([name, *(f'cache.{k}' for k in knobs)])})" if knobs else "")
                raise ValueError(f"--methods: unknown cache option '{option}'{hint}; options: {', '.join(cache_options())}")
            specs.append(MethodSpec(option))
    return specs


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The config ``python -m mukv.run <overrides>`` would run (Hydra's compose API over ``conf/``); a
    composition error becomes one line (SystemExit), as ``mukv.run`` prints it."""
    from hydra import compose, initialize_config_dir

    from mukv.config import register_configs
    from mukv.run import config_error_line

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("eval", overrides=list(overrides))
    except Exception as err:  # Hydra and OmegaConf raise many types; all are one line for the user
        raise SystemExit(f"error: {' '.join(overrides)}: {config_error_line(err)}") from None


def build_bench_method(spec: MethodSpec, tokens_per_frame: int, overrides: Sequence[str] = ()) -> CacheMethod:
    """The cache method of ``conf/cache/<option>.yaml`` plus overrides, built as a run builds it
    (``train_eval.apply_budget`` for ``budget_frames=``, then ``train_eval.build_method``). The window of
    ``WINDOW_METHODS`` is ReKV's published 15,000 tokens scaled to the model's tokens per frame, unless an
    override sets it."""
    from mukv.train_eval import apply_budget, build_method

    window = []
    if registered_name(compose_config([f"cache={spec.option}"]).cache) in WINDOW_METHODS:
        window = [f"cache.n_local={PUBLISHED_WINDOW_TOKENS * tokens_per_frame // PUBLISHED_TOKENS_PER_FRAME}"]
    cfg = compose_config([f"cache={spec.option}", *window, *spec.overrides, *overrides])
    try:
        apply_budget(cfg, tokens_per_frame)
        method = build_method(cfg.cache)
    except (MukvError, TypeError) as err:
        raise SystemExit(f"error: --methods {spec.label}: {err}") from None
    method.name = spec.label
    return method


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="0.5b", choices=["0.5b", "7b", "tiny", "nano", *QWEN_MODELS],
                        help="LLaVA-OV 0.5b / 7b or a Qwen-VL architecture with random weights; tiny / nano: small models")
    parser.add_argument("--frame-size", type=int, nargs=2, default=[448, 448], metavar=("H", "W"),
                        help="Qwen-VL: frames are H x W pixels (multiples of 28 for Qwen2.5-VL, 32 for Qwen3-VL)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: bf16 where it runs natively (GPU, AVX512-BF16/AMX CPU), else fp32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (timings synchronise the device)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="conf/cache options, comma- or space-separated (default: every method of the registry), "
                             "each followed by Hydra overrides for it alone: full,rekv mukv mukv cache.kv_quant=int8")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (--growth: a folder)")
    parser.add_argument("--growth", action="store_true", help="time and memory as the stream grows (small models)")
    parser.add_argument("--answer-every", type=int, default=600, help="--growth: answer a question every N frames")
    parser.add_argument("--profile", default=None,
                        help="a folder: after each method's stream, profile one more chunk and one answer there")
    parser.add_argument("--ops", action="store_true",
                        help="operator calls and host reads per steady chunk and per answer token, against the stock "
                             "transformers forward and decode step (--model 0.5b: its layout, narrow widths)")
    parser.add_argument("--compile", default="none", choices=[m.value for m in CompileMode],
                        help="engine.compile: the decoder layers compiled (torch.compile; reduce_overhead: CUDA graphs)")
    parser.add_argument("--llm-only", action="store_true",
                        help="--growth: random visual tokens instead of the vision tower (LLM-side curves)")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides for every method (after --), e.g. budget_frames=16 or cache.kv_quant=int8")
    args = parser.parse_args(argv)
    try:
        specs = parse_method_specs(args.methods or ordered_methods())
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        args.dtype = "bf16" if fast_bf16(args.device) else "fp32"
        print(f"--dtype auto -> {args.dtype} on {args.device}", flush=True)
    dtype = DTYPES[args.dtype]
    if args.model == "nano":
        from mukv.models.loading import load_video_llm

        llm = load_video_llm("nano", None, device=args.device, dtype=args.dtype)  # loading takes bf16/fp32/fp16
    elif args.model == "tiny":
        llm = build_tiny(0, torch.device(args.device), dtype)
    elif args.model in QWEN_MODELS:
        llm = random_qwen(args.model, dtype, args.device, args.frame_size)
    elif args.ops:  # operator calls do not depend on widths
        llm = narrow_llava_ov(args.model, device=args.device, dtype=dtype)
    else:
        llm = random_llava_ov(args.model, dtype, args.device)
    tpf = llm.geometry.tokens_per_frame
    methods = [build_bench_method(spec, tpf, args.overrides) for spec in specs]  # every config error before timing
    if args.compile != "none":
        llm.compile(CompileMode(args.compile).torch_mode)
        llm.name += f" (compiled: {args.compile})"
    for method in methods:
        try:
            method.validate(llm.geometry)
        except MukvError as err:
            parser.error(f"--methods {method.name}: {err}")
    if args.ops:
        return run_ops(llm, methods, args)
    if llm.device.type == "cuda":  # untimed: the first CUDA calls pay for kernel selection and allocator growth
        bench_method(llm, build_bench_method(MethodSpec("full"), tpf), args.chunk, args.chunk, 2)
    if args.growth:
        return run_growth(llm, methods, args)
    peak = matmul_gflops(dtype, n=8192 if llm.device.type == "cuda" else 2048, device=args.device)  # a GPU needs big tiles
    flops = frame_flops(llm)
    plain = plain_prefill_s_per_frame(llm, args.chunk)
    plain_roofline = flops["llm"] / plain / 1e9 / peak
    print(f"plain causal prefill of a {args.chunk}-frame chunk: {plain:.4g} s/frame, "
          f"{plain_roofline:.3f} of the matmul roofline", flush=True)
    rows = []
    for method in methods:
        row = bench_method(llm, method, args.frames, args.chunk, args.new_tokens,
                           Path(args.profile) if args.profile else None)
        row["vision_roofline"] = flops["vision"] / row["vision_s_per_frame"] / 1e9 / peak
        row["llm_roofline"] = flops["llm"] / row["llm_s_per_frame"] / 1e9 / peak
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    base = {r["method"]: r for r in rows}
    for r in rows:
        if "full" in base:
            r["encode_time_vs_full"] = base["full"]["encode_fps"] / r["encode_fps"]
        if "rekv" in base:
            r["encode_time_vs_rekv"] = base["rekv"]["encode_fps"] / r["encode_fps"]
            r["latency_vs_rekv"] = r["latency_s"] / base["rekv"]["latency_s"]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or
              platform.machine(), "threads": torch.get_num_threads(), "model": llm.name, "dtype": args.dtype,
              "device": _device_name(llm.device), "matmul_gflops": peak,
              "plain_prefill_s_per_frame": plain, "plain_prefill_roofline": plain_roofline, "frame_gflops": {k: v / 1e9 for k, v in flops.items()}, "rows": rows}
    print(markdown(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_growth(llm: VideoLLM, methods: list[CacheMethod], args) -> None:
    import pandas as pd

    out = Path(args.out or f"outputs/bench/growth_{llm.name}_{datetime.now():%Y%m%d_%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for method in methods:
        started = time.perf_counter()
        rows += growth_curve(llm, method, args.frames, args.chunk, args.answer_every, vision=not args.llm_only)
        pd.DataFrame(rows).to_csv(out / "growth.csv", index=False)  # kept as it goes: nothing lost if killed
        print(f"{method.name}: {args.frames} frames in {time.perf_counter() - started:.0f} s", flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "model": llm.name, "dtype": args.dtype,
            "device": _device_name(llm.device), "frames": args.frames, "chunk": args.chunk, "vision": not args.llm_only}
    (out / "growth.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    plot_growth(rows, out / "growth.png", f"{llm.name} {args.dtype}: {args.frames} frames, chunk {args.chunk}")
    md = growth_markdown(rows)
    (out / "growth.md").write_text(f"{meta}\n\n{md}\n")
    print(md)
    print(f"-> {out}")


def growth_markdown(rows: list[dict[str, Any]]) -> str:
    """Per method: the first and last chunk side by side (flat methods show ratios near 1)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    late = {name: g.iloc[len(g) // 2:] for name, g in df.groupby("method", sort=False)}  # the second half
    ref = late["rekv"].llm_s_per_frame.mean() if "rekv" in late else None
    lines = ["| method | frames | s/frame first -> last | LLM s/frame, 2nd half | vs rekv | LLM tokens/frame "
             "| attention pairs/frame first -> last | stored KV last (MB) | device KV last (MB) "
             "| TTFT first -> last (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, g in df.groupby("method", sort=False):
        a, z = g.iloc[0], g.iloc[-1]
        llm_s = late[name].llm_s_per_frame.mean()
        answered = g.dropna(subset=["ttft_s"]) if "ttft_s" in g else g.iloc[:0]
        ttft = (f"{answered.ttft_s.iloc[0]:.3f} -> {answered.ttft_s.iloc[-1]:.3f}" if len(answered) else "-")
        lines.append(f"| {name} | {int(z.frames_seen)} | {a.s_per_frame:.4f} -> {z.s_per_frame:.4f} | {llm_s:.4f} | "
                     f"{f'{llm_s / ref:.2f}' if ref else '-'} | {late[name].llm_tokens_per_frame.mean():.0f} | "
                     f"{a.attention_pairs_per_frame:.3g} -> {z.attention_pairs_per_frame:.3g} | "
                     f"{z.kv_bytes / 1e6:.1f} | {z.device_kv_bytes / 1e6:.2f} | {ttft} |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    cols = ["method", "encode_fps", "vision_s_per_frame", "llm_s_per_frame", "ttft_s", "latency_s", "online_tokens",
            "kv_bytes_per_frame", "kv_gb_per_hour_0.5fps", "encode_time_vs_rekv", "latency_vs_rekv", "llm_roofline",
            "peak_rss_gb", "peak_gpu_gb"]
    lines = [f"{result['model']} {result['dtype']} on {result['device']}, {result['threads']} threads, matmul {result['matmul_gflops']:.0f} "
             f"GFLOP/s, per frame: vision {result['frame_gflops']['vision']:.1f} GFLOP, "
             f"LLM {result['frame_gflops']['llm']:.1f} GFLOP", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else
                                       "-" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
