"""Which heads of a nano checkpoint do the two attention patterns inside the encoding that training supervises:
each ball token of a motion run looking at the ball of the frame before (``signals.motion.attend_layers``), and
each needle token looking at the needles before it (``signals.order.attend_layers``).

    python experiments/nano_head_map.py                                  # the shipped checkpoint
    python experiments/nano_head_map.py --model-path outputs/train_nano/<time>/nano/best

Held-out streams (evaluation seeds 30,000 on, never trained on), all frames at contiguous positions (``full``).
Prints, per pattern, a layer x head table of the mean attention from those rows to their keys. Heads that
serve both a pattern and ``signals.count.head`` share their value space with the counting signal
(BENCHMARKS.md section 1).
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

from mukv.models.loading import load_nano
from mukv.models.nano import ASSET_DIR
from mukv_nano.examples import make_example
from mukv_nano.forward import EncodingTargets, QuestionBatch, forward_layout, pixels_of, visual_tokens
from mukv_nano.layouts import build_layout
from mukv_nano.probes import earlier_needle_targets, previous_ball_targets


def head_map(model_path: str, streams: int, frames: int) -> dict[str, np.ndarray]:
    """{pattern: (layers, heads) mean attention mass} over ``streams`` held-out streams of ``frames`` frames."""
    llm = load_nano(model_path, torch.device("cpu"), torch.float32)  # the streaming attention hook included
    model, tokenizer = llm.model, llm.tokenizer
    init_ids = tokenizer(llm.init_prompt, add_special_tokens=False).input_ids
    layers = tuple(range(model.config.text_config.num_hidden_layers))
    examples = [make_example(30_000 + i, frames, 0.5, 4.0, split="eval",
                                   questions=10) for i in range(streams)]
    patterns = {"ball -> previous ball": previous_ball_targets(examples, len(init_ids)),
                "needle -> earlier needles": earlier_needle_targets(examples, len(init_ids))}
    targets = {name: EncodingTargets(layers, *t, head_mass=[]) for name, t in patterns.items()}
    layout, _ = build_layout("full", examples, len(init_ids), frames, random.Random(0))
    with torch.no_grad():
        vis = visual_tokens(model, pixels_of(np.concatenate([ex.frames for ex in examples])))
        forward_layout(model, llm.rope, init_ids, vis.reshape(len(examples), -1, vis.shape[-1]),
                             QuestionBatch(tokenizer, examples), layout, (), None, list(targets.values()))
    return {name: torch.stack(t.head_mass).numpy() for name, t in targets.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=str(ASSET_DIR))
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--frames", type=int, default=24)
    args = ap.parse_args()
    for name, mass in head_map(args.model_path, args.streams, args.frames).items():
        print(f"\n{name}: mean attention to the key, layer x head")
        print("| layer | " + " | ".join(f"head {h}" for h in range(mass.shape[1])) + " |")
        print("|---|" + "---|" * mass.shape[1])
        for layer, row in enumerate(mass):
            print(f"| {layer} | " + " | ".join(f"{m:.2f}" for m in row) + " |")


if __name__ == "__main__":
    main()
