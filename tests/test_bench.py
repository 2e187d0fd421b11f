"""`make bench`: methods come from composed configs (conf/cache/<option>.yaml + Hydra overrides) through the run's
own builder, budgets through the registry; the default list is the registry. Replaces the `name+knob=value`
method specs of the earlier mukv.bench (tests/test_growth.py::test_bench_method_specs_take_knobs_and_name_bad_ones
and ::test_make_bench_writes_its_table_and_ratios tested those)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mukv.bench import (
    PUBLISHED_TOKENS_PER_FRAME,
    PUBLISHED_WINDOW_TOKENS,
    MethodSpec,
    build_bench_method,
    main,
    parse_method_specs,
)
from mukv.cache import CACHE_METHODS, ordered_methods
from mukv.cache.mukv import MuKVCache


def knobs(method) -> dict:
    return {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}


def test_method_words_are_options_with_hydra_overrides():
    """An override word belongs to the option before it; quoted or not, the same methods."""
    quoted = parse_method_specs(["full,rekv", "mukv cache.share_prefixes=false 'cache.top_k=[2, 2, 1]'", "cache=uniform"])
    words = parse_method_specs(["full,rekv", "mukv", "cache.share_prefixes=false", "cache.top_k=[2, 2, 1]", "uniform"])
    assert quoted == words and [s.option for s in words] == ["full", "rekv", "mukv", "uniform"]
    assert words[2].overrides == ("cache.share_prefixes=false", "cache.top_k=[2, 2, 1]") and not words[3].overrides
    assert words[2].label == "mukv cache.share_prefixes=false cache.top_k=[2, 2, 1]"
    assert words[2].slug == "mukv+share_prefixes=false+top_k=[2,_2,_1]"
    assert [s.label for s in parse_method_specs(["mukv", "mukv", "cache.kv_quant=int8"])] == ["mukv", "mukv cache.kv_quant=int8"]
    with pytest.raises(ValueError, match="unknown cache option 'nope'; options: expected_attention, full, full_bounded, hermes, infinipot_v, knorm"):
        parse_method_specs(["full,nope"])
    with pytest.raises(ValueError, match="after the option: mukv cache.share_prefixes=false"):
        parse_method_specs(["mukv+share_prefixes=false"])  # the earlier name+knob=value syntax says what replaced it
    with pytest.raises(ValueError, match="must follow the cache option"):
        parse_method_specs(["cache.rerank=false", "mukv"])


def test_bench_methods_are_built_from_their_configs():
    """Each default method equals its config's defaults (the published settings), the window methods with the
    published 15,000-token window scaled to the model's tokens per frame (the knobs the earlier bench used)."""
    for tpf in (196, 16):
        window = PUBLISHED_WINDOW_TOKENS * tpf // PUBLISHED_TOKENS_PER_FRAME
        for name in ordered_methods():
            built = build_bench_method(MethodSpec(name), tpf)
            expected = knobs(CACHE_METHODS[name]())
            if name in ("sliding_window", "rekv", "streamkv"):  # ReKV's encoding window
                expected["n_local"] = window
            assert type(built) is CACHE_METHODS[name] and knobs(built) == expected, (tpf, name)
    m = build_bench_method(MethodSpec("mukv", ("cache.share_prefixes=false", "cache.top_k=[2, 2, 1]")), 16)
    assert isinstance(m, MuKVCache) and m.share_prefixes is False and m.top_k == [2, 2, 1]
    assert m.name == "mukv cache.share_prefixes=false cache.top_k=[2, 2, 1]"
    assert build_bench_method(MethodSpec("rekv"), 196).n_local == 15000  # the published window at 196 tokens per frame
    budget = build_bench_method(MethodSpec("rekv"), 16, ["budget_frames=8", "cache.n_local=64"])
    assert budget.retrieve_size == 8 and budget.n_local == 64  # budget through the registry; overrides win
    assert build_bench_method(MethodSpec("mukv"), 16, ["budget_frames=32"]).top_k == [10, 16, 6]
    with pytest.raises(SystemExit, match=r"unknown config key 'cache.bogus'"):
        build_bench_method(MethodSpec("mukv"), 16, ["cache.bogus=1"])


def test_make_bench_writes_its_table_and_ratios(tmp_path, capsys):
    """`make bench` end to end on the nano model: every method's row, ratios against rekv and full from the
    same run, the roofline fractions, the plain prefill ceiling, the JSON in a folder that did not exist,
    and the profile of each method's extra chunk and answer."""
    out = tmp_path / "new" / "bench.json"
    main(["--model", "nano", "--dtype", "fp32", "--frames", "4", "--chunk", "4", "--new-tokens", "2",
          "--methods", "full,rekv", "mukv", "cache.share_prefixes=false", "--out", str(out),
          "--profile", str(tmp_path / "prof")])
    result = json.loads(out.read_text())
    assert result["plain_prefill_s_per_frame"] > 0 and 0 < result["plain_prefill_roofline"]
    for stem in ("full", "rekv", "mukv+share_prefixes=false"):  # --profile: one more chunk and one answer
        for step in ("ingest", "answer"):
            summary = json.loads((tmp_path / "prof" / f"{stem}_{step}.json").read_text())
            assert summary["ops"] > 0 and summary["wall_s"] > 0 and summary["syncs"] == 0  # no waits on a CPU
            assert "aten::" in (tmp_path / "prof" / f"{stem}_{step}.txt").read_text()
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["full", "rekv", "mukv cache.share_prefixes=false"]
    assert rows["rekv"]["encode_time_vs_rekv"] == 1.0 and rows["full"]["encode_time_vs_full"] == 1.0
    for r in rows.values():
        assert r["encode_fps"] > 0 and 0 < r["llm_roofline"] and r["peak_gpu_gb"] is None
    assert result["device"] == "cpu" and result["matmul_gflops"] > 0
    assert "| mukv cache.share_prefixes=false |" in capsys.readouterr().out


def test_bench_defaults_to_the_registry_and_takes_overrides_for_every_method(tmp_path):
    """No --methods: every method of the registry; overrides after the options apply to every method."""
    out = tmp_path / "bench.json"
    main(["--model", "tiny", "--dtype", "fp32", "--frames", "2", "--chunk", "2", "--new-tokens", "1",
          "--out", str(out), "--", "budget_frames=1"])
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ordered_methods()
    online = {r["method"]: r["online_tokens"] for r in rows}
    assert online["sliding_window"] < online["full"]  # one frame of window against the whole stream
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--methods", "nope"])


def test_gpu_check_script_runs_end_to_end_on_a_cpu(tmp_path):
    """experiments/gpu_check.sh is the device call of BENCHMARKS section 7, written before a GPU is lent: run here
    with the CPU and the tiny model (its knobs), every step must write its table."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUT": str(tmp_path),
           "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_MODEL": "tiny", "FRAMES": "8", "BENCH_CHUNKS": "4",
           "GPU_CHECK_METHODS": "rekv", "COMPILE": "default", "GROWTH_FRAMES": "32", "GROWTH_METHODS": "rekv"}
    proc = subprocess.run(["bash", "experiments/gpu_check.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("ops_eager.json", "ops_compiled.json", "bench4.json", "bench4_compiled.json", "log.txt",
                 "details.tgz"):
        assert (tmp_path / name).is_file(), name
    eager, compiled = (json.loads((tmp_path / f"ops_{k}.json").read_text())["rows"][0] for k in ("eager", "compiled"))
    assert compiled["decode_ops"] < eager["decode_ops"] and compiled["plain_decode_ops"] == eager["plain_decode_ops"]
    log = (tmp_path / "log.txt").read_text()
    assert "Traceback" not in log and "| rekv |" in log and "LLM s/frame, 2nd half" in log
