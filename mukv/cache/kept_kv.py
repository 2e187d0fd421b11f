"""The shared mechanics of methods that keep a compressed copy of the video's KV on the device (InfiniPot-V, the
presses): frames prefilled at their original positions over the init prompt and every kept token, keys kept
rotated at those positions (as a model's own cache holds them), each layer and KV head free to keep different
tokens, and an answer over everything kept from the position after the last frame."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mukv.cache.base import AnswerContext, CacheMethod, CacheStats, Recalled, tensor_bytes
from mukv.cache.kernels import causal_suffix_attention, token_range

# observe(layer, queries before RoPE, rotated queries, all visible rotated keys, their values, scaling) during a
# prefill: scoring signals of the new tokens (their attention, their queries) without a second forward
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], None]


class KeptKVCache(CacheMethod):
    """Per layer: the init prompt's KV, then the kept video tokens' rotated keys and values (1, kv_heads, L, d)
    in time order; their video token indices per layer and head in one tensor (layers, kv_heads, L): every layer
    holds as many tokens, so a prefill appends them and a compression keeps them in one operator call each, not
    one per layer. Subclasses decide what to keep (``keep``) and when."""

    def start_video(self, init_ids: list[int]) -> None:
        self.n_init = len(init_ids)
        self.frames_seen = 0
        n = self.geometry.num_layers
        self.init_k: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        self.init_v: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        self.keys: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        self.values: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        rope = self.llm.rope

        def encode_init(idx: int, q, k, v, scaling):
            k_rot = rope.rotate_range(k, 0)
            self.init_k[idx], self.init_v[idx] = k_rot, v
            self.keys[idx], self.values[idx] = k_rot[..., :0, :], v[..., :0, :]
            return causal_suffix_attention(rope.rotate_range(q, 0), k_rot, v, scaling)

        self.run_layers(self.llm.embed_ids(init_ids), encode_init)
        k0 = self.init_k[0]
        self.tokens = torch.empty(n, k0.shape[1], 0, dtype=torch.long, device=k0.device)

    @property
    def held_tokens(self) -> int:
        """Video tokens each KV head of each layer holds now."""
        return int(self.tokens.shape[-1])

    def prefill(self, visual: torch.Tensor, first_frame: int, observe: Observer | None = None) -> None:
        """Frames (F, tokens_per_frame, hidden) at their original positions, attending to the init prompt, every
        kept token and themselves (causal); their KV joins the kept tokens of every head."""
        tpf = self.geometry.tokens_per_frame
        start = first_frame * tpf
        rotate = self.rotations(start, visual.shape[0] * tpf, visual.device)

        def attend(idx: int, q, k, v, scaling):
            k_rot, q_rot = rotate(idx, k), rotate(idx, q)
            keys = torch.cat((self.init_k[idx], self.keys[idx], k_rot), dim=-2)
            vals = torch.cat((self.init_v[idx], self.values[idx], v), dim=-2)
            if observe is not None:
                observe(idx, q, q_rot, keys, vals, scaling)
            # the kept tokens are a view of what was just attended (one copy of the kept KV per prefill, not two)
            n_init = self.n_init
            self.keys[idx], self.values[idx] = token_range(keys, n_init), token_range(vals, n_init)
            return causal_suffix_attention(q_rot, keys, vals, scaling)

        self.run_layers(visual.reshape(1, -1, visual.shape[-1]), attend)
        # every head of every layer holds the new tokens: one append for all of them
        new_tokens = torch.arange(start, start + visual.shape[0] * tpf, device=visual.device)
        self.tokens = torch.cat((self.tokens, new_tokens.expand(*self.tokens.shape[:2], -1)), dim=-1)
        self.frames_seen = max(self.frames_seen, first_frame + visual.shape[0])

    def probe(self, ids: list[int], observe: Observer, num_layers: int | None = None) -> None:
        """Run the tokens ``ids`` (a template, a pseudo-question) after everything kept, each layer at the position
        its next video token would take, causal among themselves, and hand each layer's attention inputs to
        ``observe`` (as ``prefill``'s); their KV is not kept. ``num_layers``: only the first ones run (those
        ``observe`` reads)."""
        rotate = self.rotations(self.frames_seen * self.geometry.tokens_per_frame, len(ids), self.llm.device)

        def attend(idx: int, q, k, v, scaling):
            q_rot, k_rot = rotate(idx, q), rotate(idx, k)
            keys = torch.cat((self.init_k[idx], self.keys[idx], k_rot), dim=-2)
            vals = torch.cat((self.init_v[idx], self.values[idx], v), dim=-2)
            observe(idx, q, q_rot, keys, vals, scaling)
            return causal_suffix_attention(q_rot, keys, vals, scaling)

        self.run_layers(self.llm.embed_ids(ids), attend, num_layers)

    def prefill_position(self, layer: int, first_token: int) -> int:
        """Position of video token ``first_token`` (the first being prefilled) in ``layer``: its original one
        (after the init prompt); a method that moves positions (HERMES) says where its next tokens go."""
        return self.n_init + first_token

    def rotations(self, first_token: int, length: int, device: torch.device) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """``rotate(layer, x)``: ``x`` (..., length, d) rotated to the positions from ``prefill_position(layer,
        first_token)`` on. A method whose positions live on the device (HERMES) builds every layer's table at once,
        without reading them."""
        rope = self.llm.rope
        return lambda idx, x: rope.rotate_range(x, self.prefill_position(idx, first_token))

    def keep(self, picked: torch.Tensor) -> None:
        """Keep, in every layer, the held tokens at ``picked``: indices into each layer's video tokens, sorted,
        (layers, kv_heads, n) where heads choose apart, or (layers, n) where a layer's heads keep the same
        tokens. The gather index of every layer is expanded over the head width once, not once per layer."""
        if picked.dim() == 2:
            picked = picked[:, None].expand(-1, self.tokens.shape[1], -1)
        index = picked[:, None, :, :, None].expand(-1, -1, -1, -1, self.keys[0].shape[-1])
        for layer, rows in enumerate(index.unbind(0)):  # (1, kv_heads, n, d)
            self.keys[layer] = torch.gather(self.keys[layer], 2, rows)
            self.values[layer] = torch.gather(self.values[layer], 2, rows)
        self.tokens = torch.gather(self.tokens, 2, picked)

    def kept_context(self, detail=None) -> AnswerContext:
        """Init + everything kept, at the positions it was kept at; each layer's prompt where its next video token
        would go (``prefill_position``: after the last frame, unless the method moves positions). ``recalled``:
        the video tokens some head of some layer holds (negative indices, such as HERMES's summaries, are none)."""
        keys = [torch.cat((ik, k), dim=-2) for ik, k in zip(self.init_k, self.keys, strict=True)]
        values = [torch.cat((iv, v), dim=-2) for iv, v in zip(self.init_v, self.values, strict=True)]
        held = torch.unique(self.tokens)
        positions = self.answer_positions()
        return AnswerContext(keys, values, next_position=max(positions), recalled=Recalled(tokens=held[held >= 0].tolist()),
                             detail=detail, layer_positions=positions)

    def answer_positions(self) -> list[int]:
        """Each layer's position for the answer's first token: where its next video token would go."""
        next_token = self.frames_seen * self.geometry.tokens_per_frame
        return [self.prefill_position(i, next_token) for i in range(len(self.keys))]

    def stats(self) -> CacheStats:
        kv = sum(tensor_bytes(ik, iv, k, v)
                 for ik, iv, k, v in zip(self.init_k, self.init_v, self.keys, self.values, strict=True))
        return CacheStats(kv_tokens=self.n_init + self.held_tokens, kv_bytes=kv, device_kv_bytes=kv)
