"""Training the nano model on the synthetic benchmark, under every cache method's context layout.

    python -m mukv_nano.train                                   # the recipe of the shipped checkpoint
    python -m mukv_nano.train train.publish=true                # ... and copy the best over mukv/assets/nano
    python -m mukv_nano.train nano_recipe=previous_recipe       # an earlier recipe (conf/nano_recipe/)
    python -m mukv_nano.train signals.order.weight=0 curriculum.max_frames=16 train.max_minutes=5

One step: the curriculum picks the streams' length, density, question types and layout; the batch is encoded
under that layout; the answer loss (cross-entropy of every answer token) plus each enabled signal's terms
(times its weight) is minimised with AdamW under a warmup + cosine schedule. Every ``train.save_every_s`` the
model answers validation streams (training seeds, never trained on; first answer token, ``full`` layout)
and is saved to ``<run>/nano/last`` (and ``best`` when validation improves). The run folder is
``outputs/<task_name>/<time>/`` with ``metrics.json``; ``model.path=<run>/nano/best`` evaluates a checkpoint
with ``python -m mukv.run``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from mukv.data.synthetic import TRAIN_SEED_BASE
from mukv.errors import ConfigError, MukvError
from mukv.models import attention_hook
from mukv.models.adapter import DEFAULT_INIT_PROMPT
from mukv.models.rope import RotaryTable
from mukv_nano.examples import VAL_SEED_BASE, Example, make_example
from mukv_nano.forward import Batch, EncodingTargets, QuestionBatch, forward_layout, pixels_of, visual_tokens
from mukv_nano.layouts import build_layout
from mukv_nano.recipe import SIGNALS, LoopConfig, Recipe, recipe_from_config, register_configs
from mukv_nano.signals import Signal

register_configs()
log = logging.getLogger("mukv_nano")


def build_signals(recipe: Recipe, model, tokenizer) -> list[Signal]:
    """The signals the recipe turns on (weight > 0), in ``SIGNALS`` order."""
    return [cls(getattr(recipe.signals, name), model, tokenizer, recipe.net) for name, cls in SIGNALS.items()
            if getattr(recipe.signals, name).weight > 0]


def batch_loss(model, rope: RotaryTable, tokenizer, init_ids: list[int], examples: list[Example], layout_name: str,
               rng: random.Random, signals: Sequence[tuple[Signal, float]] = (),
               parts: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """The answer loss of one batch under ``layout_name`` plus each (signal, weight)'s weighted terms (their
    values go into ``parts`` when given), and first-answer-token accuracy per question type."""
    layout, kept = build_layout(layout_name, examples, len(init_ids), len(examples[0].frames), rng)
    if kept is not None:
        examples = [ex.keep_frames(k) for ex, k in zip(examples, kept, strict=True)]
    vis = visual_tokens(model, pixels_of(np.concatenate([ex.frames for ex in examples])))
    vis = vis.reshape(len(examples), -1, vis.shape[-1])
    qb = QuestionBatch(tokenizer, examples)
    batch = Batch(examples, qb, layout, len(init_ids), len(init_ids) + vis.shape[1], vis)
    live = [(signal, weight) for signal, weight in signals if signal.applies(layout)]
    targets = [signal.targets(batch) for signal, _ in live]  # what the forward records for each signal
    recorders = [t for ts in targets for t in ts]
    hidden: list | None = [] if any(signal.reads_hidden for signal, _ in live) else None
    logits = forward_layout(model, rope, init_ids, vis, qb, layout,
                            [t for t in recorders if not isinstance(t, EncodingTargets)], hidden,
                            [t for t in recorders if isinstance(t, EncodingTargets)])
    batch.hidden = tuple(hidden) if hidden is not None else None
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), qb.targets.reshape(-1), ignore_index=-100)
    for (signal, weight), recorded in zip(live, targets, strict=True):
        for name, value in signal.loss(batch, recorded).items():
            if value is not None:
                loss = loss + weight * value
                if parts is not None:
                    parts[name] = float(value.detach())
    with torch.no_grad():
        first = logits.gather(2, qb.answer_pos.clamp(min=0)[..., None, None].expand(-1, -1, 1, logits.shape[-1])).squeeze(2)
        right = (first.argmax(-1) == qb.answer_tok)
    stats: dict[str, list[int]] = {}
    for i, tys in enumerate(qb.types):
        for j, t in enumerate(tys):
            s = stats.setdefault(t, [0, 0])
            s[0] += int(right[i, j])
            s[1] += 1
    return loss, {k: (v[0], v[1]) for k, v in stats.items()}


@torch.no_grad()
def validate(model, rope: RotaryTable, tokenizer, init_ids: list[int], n_videos: int, n_frames: int, fps: float,
             layout: str = "full", batch: int = 16) -> dict[str, float]:
    """First-answer-token accuracy per type on validation streams (training seed range, never trained on)."""
    model.eval()
    rng = random.Random(1234)
    tot: dict[str, list[int]] = {}
    for a in range(0, n_videos, batch):
        exs = [make_example(VAL_SEED_BASE + a + i, n_frames, fps, 4.0) for i in range(min(batch, n_videos - a))]
        _, st = batch_loss(model, rope, tokenizer, init_ids, exs, layout, rng)
        for k, (r, n) in st.items():
            t = tot.setdefault(k, [0, 0])
            t[0] += r
            t[1] += n
    model.train()
    acc = {k: r / n for k, (r, n) in tot.items()}
    acc["mean"] = float(np.mean(list(acc.values())))
    return acc


def lr_at(loop: LoopConfig, progress: float) -> float:
    """Linear warmup over ``warmup`` of the schedule, then cosine down to 5% of ``lr``."""
    if progress < loop.warmup:
        return loop.lr * min(1.0, progress / loop.warmup)
    return loop.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (progress - loop.warmup) / (1 - loop.warmup))))


def train_nano(recipe: Recipe, out_dir: str | Path, publish_dir: str | Path | None = None) -> dict:
    """Train (from scratch, or on from ``net.init_from``); checkpoints go to ``out_dir`` (``last/`` and ``best/``),
    the best is copied to ``publish_dir`` when given. Returns the training record."""
    from mukv.models.nano import build_nano, load_nano_checkpoint, save_nano

    loop, net, curriculum = recipe.train, recipe.net, recipe.curriculum
    if loop.threads:
        torch.set_num_threads(loop.threads)
    if loop.bf16 is None:
        from mukv.models.loading import fast_bf16

        loop = replace(loop, bf16=fast_bf16("cpu"))
        recipe = replace(recipe, train=loop)
        log.info("train.bf16 auto -> %s", loop.bf16)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(loop.seed)
    if net.init_from:
        model, tokenizer = load_nano_checkpoint(net.init_from, field="net.init_from")
        torch.manual_seed(loop.seed)  # the probes' initial weights (build_nano seeds a model built from scratch)
    else:
        model, tokenizer = build_nano(loop.seed, net.cell_words, **net.head_dims())
    model.model.language_model.config._attn_implementation = attention_hook.register()
    model.train()
    rope = RotaryTable(model.model.language_model.rotary_emb.inv_freq)
    init_ids = tokenizer(DEFAULT_INIT_PROMPT, add_special_tokens=False).input_ids
    signals = build_signals(recipe, model, tokenizer)
    params = list(model.named_parameters()) + [p for s in signals for p in s.named_parameters()]
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": loop.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=loop.lr, betas=(0.9, 0.98))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("nano: %.2fM parameters; signals %s; %s", n_params / 1e6, [s.name for s in signals], asdict(recipe))
    history: list[dict] = []
    best = -1.0
    t0 = last_save = time.time()
    step, progress = 0, 0.0
    run_stats: dict[str, list[int]] = {}
    run_loss: list[float] = []
    run_parts: dict[str, list[float]] = {}
    record = {"settings": asdict(recipe), "parameters": n_params, "history": history}

    def save(tag: str, val: dict | None) -> None:
        nonlocal best
        rec = {**record, "steps": step, "progress": progress, "minutes": (time.time() - t0) / 60, "val": val}
        save_nano(model, tokenizer, out / "last", rec)
        if val is not None and val["mean"] >= best:
            best = val["mean"]
            save_nano(model, tokenizer, out / "best", {**rec, "best": True})
            if publish_dir is not None:
                _publish(out / "best", Path(publish_dir))
        log.info("saved %s checkpoint at step %d (val %s)", tag, step, val)

    def validation() -> dict[str, float]:
        return validate(model, rope, tokenizer, init_ids, loop.val_videos, curriculum.max_frames, curriculum.sample_fps)

    while progress < 1.0:
        progress = max(step / loop.steps, (time.time() - t0) / 60 / loop.max_minutes)
        lr = lr_at(loop, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        # this step's streams
        n_frames, gap, layout = curriculum.sample_step(progress, rng)
        seeds = [TRAIN_SEED_BASE + loop.seed * 10_000_000 + step * loop.batch_size + i for i in range(loop.batch_size)]
        types, rings = curriculum.step_types(progress, rng)
        examples = [make_example(s, n_frames, curriculum.sample_fps, gap, types=curriculum.stream_types(types, rng),
                                 rings=rings, questions=curriculum.questions_per_stream or None) for s in seeds]
        # the signals on at this point of the schedule, with their weights
        weighted = [(s, s.weight_at(progress, curriculum)) for s in signals]
        weighted = [(s, w) for s, w in weighted if w > 0]
        parts: dict[str, float] = {}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=loop.bf16):
            loss, stats = batch_loss(model, rope, tokenizer, init_ids, examples, layout, rng, weighted, parts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], loop.grad_clip)
        opt.step()
        step += 1
        # running means, logged every 25 steps
        run_loss.append(float(loss.detach()))
        for k, v in parts.items():
            run_parts.setdefault(k, []).append(v)
        for k, (r, n) in stats.items():
            s = run_stats.setdefault(k, [0, 0])
            s[0] += r
            s[1] += n
        if step % 25 == 0:
            accs = {k: round(r / max(1, n), 3) for k, (r, n) in run_stats.items()}
            entry = {"step": step, "progress": round(progress, 4), "min": round((time.time() - t0) / 60, 2),
                     "lr": round(lr, 6), "loss": round(float(np.mean(run_loss)), 4), "frames_max": n_frames,
                     "train_acc": accs, "aux": {k: round(float(np.mean(v)), 4) for k, v in run_parts.items()}}
            history.append(entry)
            log.info("%s", json.dumps(entry))
            run_stats, run_loss, run_parts = {}, [], {}
        if time.time() - last_save > loop.save_every_s:
            save("periodic", validation())
            last_save = time.time()
    val = validation()
    save("final", val)
    return {**record, "steps": step, "val": val, "best_val_mean": best}


def _publish(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder over ``dst`` (the shipped asset folder), file by file."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy2(f, dst / f.name)


# ------------------------------------------------------------------------------------------- the run
def train_from_config(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Check a composed ``conf/train_nano.yaml``, train, and write ``metrics.json`` into ``out_dir`` (checkpoints
    in ``<out_dir>/nano/{last,best}``; ``train.publish=true`` also copies the best over ``mukv/assets/nano``).
    Returns the metrics. Every check runs before any model loads."""
    from mukv.models.nano import ASSET_DIR
    from mukv.report.outputs import METRICS, write_json_atomic
    from mukv.resume import RunLock

    if OmegaConf.select(cfg, "model.name") != "nano":
        raise ConfigError("model", f"mukv_nano trains the nano model (model=nano), got '{OmegaConf.select(cfg, 'model.name')}'")
    if OmegaConf.select(cfg, "dataset.synthetic") is None:
        raise ConfigError("dataset", "mukv_nano trains on the synthetic benchmark (dataset=synthetic)")
    recipe = recipe_from_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        (out / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        started = time.time()
        record = train_nano(recipe, out / "nano", publish_dir=ASSET_DIR if recipe.train.publish else None)
        val = record.get("val") or {}
        metrics = {"method": "train", "dataset": cfg.dataset.name, "model": cfg.model.name, "steps": record["steps"],
                   "accuracy": val.get("mean"), "val_accuracy": val, "wall_s": time.time() - started,
                   "checkpoint": str(out / "nano" / "best")}
        write_json_atomic(out / METRICS, metrics)
    return metrics


def summary(metrics: dict) -> str:
    """The lines printed when a run ends."""
    by_type = ", ".join(f"{k} {v:.2f}" for k, v in (metrics.get("val_accuracy") or {}).items())
    accuracy = metrics.get("accuracy")
    return "\n".join([f"  steps          {metrics['steps']}",
                      f"  val accuracy   {accuracy:.4g}" if accuracy is not None else "  val accuracy   None",
                      f"  val by type    {by_type}", f"  wall s         {metrics['wall_s']:.4g}",
                      f"  checkpoint     {metrics['checkpoint']}"])


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_nano")
def main(cfg: DictConfig) -> None:
    from mukv.run import check_composed

    try:
        check_composed(cfg)
        metrics = train_from_config(cfg, cfg.paths.output_dir)
    except MukvError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"\nnano trained -> {Path(metrics['checkpoint']).parent.parent}")
    print(summary(metrics))


if __name__ == "__main__":
    from mukv.run import install_config_error_handler

    install_config_error_handler()
    main()
