"""Why the nano model answers "What shape is at row r column c now?" at chance: short fine-tuning pilots.

Each pilot fine-tunes a nano checkpoint (the shipped one by default) on "current" questions only (4-frame
streams, the ``full`` layout), then answers held-out streams (the validation seed range, never trained on):

    python experiments/nano_current_pilot.py                                  # answer loss only
    python experiments/nano_current_pilot.py --cell-words --parse-weight 1    # + the asked-cell probe
    python experiments/nano_current_pilot.py --cell-words --parse-weight 1 --attend-weight 3 --attend-head mean
    python experiments/nano_current_pilot.py --oracle-layer 3                 # diagnostic, see below

``--cell-words`` gives the checkpoint the tokenizer whose "row r" / "column c" are single tokens (new rows
start at the mean of the two words' embeddings). ``--parse-weight`` trains ``AskedCellProbe`` at hidden state
``--parse-layer``; ``--attend-weight`` supervises the answer position's attention on the asked token of the
last frame in ``--attend-layers``, with ``--attend-head`` (``best``, ``mean`` or an index). ``--oracle-layer``
is a diagnostic, not a method: in that layer every head's output at the answer position is replaced by the
asked token's value, which is what perfect attention would hand the readout. It says whether the readout
can be learned once the lookup is right (it is applied to the held-out answers too).

Prints a JSON line every 25 steps and a final held-out line: answer accuracy, the answers given, the
attention mass on the asked token per supervised layer, and how often the probe names the asked cell.
BENCHMARKS.md section 1 records what these showed.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

import mukv_nano.forward as forward
from mukv.data.synthetic import GRID, TRAIN_SEED_BASE
from mukv.models import attention_hook
from mukv.models.adapter import DEFAULT_INIT_PROMPT
from mukv.models.nano import ASSET_DIR, build_word_tokenizer, cell_words, load_nano_checkpoint
from mukv.models.rope import RotaryTable
from mukv_nano.examples import VAL_SEED_BASE, make_example
from mukv_nano.forward import QuestionBatch, forward_layout, pixels_of, visual_tokens
from mukv_nano.layouts import build_layout
from mukv_nano.probes import AskedCellProbe, ParseConfig
from mukv_nano.recipe import NetConfig
from mukv_nano.signals import attention_targets


def with_cell_words(model, tokenizer):
    """The model with the cell-word tokenizer: every old word keeps its embedding row; "row r" starts at
    the mean of "row" and "r"."""
    new = build_word_tokenizer(with_cell_words=True)
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(len(new), mean_resizing=False)
    w = model.get_input_embeddings().weight
    with torch.no_grad():
        for word, i in new.get_vocab().items():
            parts = word.split(" ") if word in cell_words() else [word]
            w[i] = torch.stack([old[tokenizer.convert_tokens_to_ids(p)] for p in parts]).mean(0)
    model.tie_weights()
    return model, new


class Oracle:
    """Replaces, in one layer, each answer position's attention output by the asked token's value."""

    def __init__(self, layer: int, n_layers: int) -> None:
        self.layer, self.n_layers, self.calls, self.rows = layer, n_layers, 0, []
        self.sdpa = forward.grouped_sdpa

    def __call__(self, q, k, v, scaling, mask):
        out = self.sdpa(q, k, v, scaling, mask)
        if mask is not None and mask.dim() == 4:  # the questions' call, once per layer
            if self.calls % self.n_layers == self.layer:
                out = out.clone()
                for i, row, key in self.rows:
                    out[i, :, row] = v[i, :, key].repeat_interleave(q.shape[1] // v.shape[1], dim=0)
            self.calls += 1
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ASSET_DIR))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--cell-words", action="store_true")
    ap.add_argument("--parse-weight", type=float, default=0.0)
    ap.add_argument("--parse-layer", type=int, default=2)
    ap.add_argument("--attend-weight", type=float, default=0.0)
    ap.add_argument("--attend-layers", default="3")
    ap.add_argument("--attend-head", default="best")
    ap.add_argument("--oracle-layer", type=int, default=None)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.parse_weight > 0 and not args.cell_words:
        ap.error("--parse-weight reads the cell words: add --cell-words")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_nano_checkpoint(args.checkpoint)
    if args.cell_words and "row 1" not in tok.get_vocab():
        model, tok = with_cell_words(model, tok)
    lm = model.model.language_model
    lm.config._attn_implementation = attention_hook.register()
    rope = RotaryTable(lm.rotary_emb.inv_freq)
    init_ids = tok(DEFAULT_INIT_PROMPT, add_special_tokens=False).input_ids
    n_init, hidden = len(init_ids), model.config.text_config.hidden_size
    layers = tuple(int(x) for x in args.attend_layers.split(","))
    probe = None
    if args.cell_words:
        probe = AskedCellProbe(ParseConfig(weight=args.parse_weight, layer=args.parse_layer, attend_layers=[]), model, tok,
                               NetConfig(cell_words=True))
    oracle = None
    if args.oracle_layer is not None:
        oracle = Oracle(args.oracle_layer, model.config.text_config.num_hidden_layers)
        forward.grouped_sdpa = oracle  # the training forward's attention calls go through it
    params = list(model.parameters()) + (list(probe.parameters()) if probe is not None else [])
    opt = torch.optim.AdamW(params, lr=args.lr)

    def run(examples):
        layout, _ = build_layout("full", examples, n_init, args.frames, random.Random(0))
        qb = QuestionBatch(tok, examples)
        if oracle is not None:
            oracle.rows = [(i, j * qb.q_len + int(qb.answer_pos[i, j]), n_init + q.meta["frame"] * 16 + q.meta["cell"])
                           for i, ex in enumerate(examples) for j, q in enumerate(ex.questions)]
        vis = visual_tokens(model, pixels_of(np.concatenate([e.frames for e in examples])))
        vis = vis.reshape(len(examples), -1, hidden)
        targets = attention_targets(layout, examples, qb, n_init, layers, args.attend_head, ("current",))
        hid: list = []
        logits = forward_layout(model, rope, init_ids, vis, qb, layout, [targets], hid)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), qb.targets.reshape(-1), ignore_index=-100)
        rec = {}
        if args.attend_weight > 0:
            loss = loss + args.attend_weight * targets.loss()
        if probe is not None:
            loss = loss + args.parse_weight * probe.probe_loss(tuple(hid), examples, qb, n_init + vis.shape[1])
            rows, cols, cells = probe.read(tuple(hid), examples, qb, n_init + vis.shape[1])
            rec["parse_acc"] = float(((rows.argmax(-1) == cells // GRID) & (cols.argmax(-1) == cells % GRID))
                                     .float().mean())
        first = logits.gather(2, qb.answer_pos.clamp(min=0)[..., None, None].expand(-1, -1, 1, logits.shape[-1]))
        top = first.squeeze(2).argmax(-1)
        valid = qb.answer_pos >= 0
        rec["acc"] = float((top == qb.answer_tok)[valid].float().mean())
        rec["answers"] = dict(Counter(tok.convert_ids_to_tokens(top[valid].tolist())))
        supervised = targets.target.any(-1)
        rec["mass"] = [round(float(m.exp().amax(1)[supervised].mean()), 3) for m in targets.log_mass]
        return loss, rec

    t0 = time.time()
    window: list[dict] = []
    for step in range(args.steps):
        examples = [make_example(TRAIN_SEED_BASE + 7_000_000 + step * 16 + i, args.frames, 0.5, 4.0,
                                 types=("current",), questions=4) for i in range(16)]
        loss, rec = run(examples)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(rec)
        if (step + 1) % 25 == 0:
            print(json.dumps({"step": step + 1, "s": round(time.time() - t0),
                              "acc": round(float(np.mean([r["acc"] for r in window])), 3),
                              "parse_acc": round(float(np.mean([r.get("parse_acc", 0) for r in window])), 3),
                              "mass": rec["mass"]}), flush=True)
            window = []
    with torch.no_grad():
        examples = [make_example(VAL_SEED_BASE + 7_000 + i, args.frames, 0.5, 4.0, types=("current",), questions=4)
                    for i in range(args.heldout)]
        _, rec = run(examples)
    print(json.dumps({"heldout": rec, "args": vars(args)}))


if __name__ == "__main__":
    main()
