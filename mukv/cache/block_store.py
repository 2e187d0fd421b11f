"""A store of KV blocks for one video: host memory (pinned on CUDA), spilling to disk past a RAM budget.

A block is a run of tokens kept together: a frame for ReKV; a patch, frame or segment (after trimming)
for MuKV. It holds every layer's un-rotated keys and values, (layers, kv_heads, tokens, head_dim), the
positions its tokens were encoded at, and what part of the video it covers. Byte accounting is exact:
2 x layers x kv_heads x head_dim x element size per token.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class Block:
    id: int
    k: torch.Tensor  # (layers, kv_heads, n, head_dim), un-rotated
    v: torch.Tensor
    positions: torch.Tensor  # (n,) positions the tokens were encoded at
    first_frame: float  # the first frame it covers (fractional for sub-frame blocks)
    num_frames: float
    on_disk: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.k.shape[2])

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class BlockStore:
    """Blocks of one video in host memory; beyond ``ram_budget_bytes`` new blocks go to memory-mapped
    files under ``spill_dir`` (a temporary folder by default, removed by ``clear``)."""

    def __init__(self, pin_memory: bool = False, ram_budget_bytes: int | None = None,
                 spill_dir: str | Path | None = None) -> None:
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.ram_budget_bytes = ram_budget_bytes
        self._spill_parent = spill_dir
        self._spill_dir: Path | None = None
        self.blocks: list[Block] = []
        self.ram_bytes = 0
        self.disk_bytes = 0

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def nbytes(self) -> int:
        return self.ram_bytes + self.disk_bytes

    @property
    def tokens(self) -> int:
        return sum(b.tokens for b in self.blocks)

    @property
    def spill_dir(self) -> Path | None:
        return self._spill_dir

    def add(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None,
            first_frame: float = 0.0, num_frames: float = 1.0, meta: dict[str, Any] | None = None) -> int:
        """Store one block (all layers); returns its id (0, 1, ... in insertion order)."""
        n = k.shape[2]
        pos = torch.arange(n) if positions is None else positions.detach().to("cpu", torch.long)
        size = 2 * k.numel() * k.element_size()
        spill = self.ram_budget_bytes is not None and self.ram_bytes + size > self.ram_budget_bytes
        if spill:
            k_host, v_host = self._to_disk(k, len(self.blocks), "k"), self._to_disk(v, len(self.blocks), "v")
            self.disk_bytes += size
        else:
            k_host, v_host = self._to_host(k), self._to_host(v)
            self.ram_bytes += size
        block = Block(len(self.blocks), k_host, v_host, pos, first_frame, num_frames, spill, dict(meta or {}))
        self.blocks.append(block)
        return block.id

    def layer_kv(self, ids: list[int], layer: int, device: torch.device | str,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``ids`` (in that order) for one layer: (1, kv_heads, sum n, head_dim)."""
        ks = [self.blocks[i].k[layer] for i in ids]
        vs = [self.blocks[i].v[layer] for i in ids]
        k = torch.cat(ks, dim=1)[None].to(device, dtype=dtype, non_blocking=True)
        v = torch.cat(vs, dim=1)[None].to(device, dtype=dtype, non_blocking=True)
        return k, v

    def positions(self, ids: list[int]) -> torch.Tensor:
        return torch.cat([self.blocks[i].positions for i in ids]) if ids else torch.empty(0, dtype=torch.long)

    def clear(self) -> None:
        """Drop every block and remove spill files."""
        self.blocks.clear()
        self.ram_bytes = self.disk_bytes = 0
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def __del__(self) -> None:
        if getattr(self, "_spill_dir", None) is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------ internals
    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        host = t.detach().to("cpu").contiguous()
        if host is t:
            host = host.clone()
        return host.pin_memory() if self.pin_memory else host

    def _to_disk(self, t: torch.Tensor, block_id: int, name: str) -> torch.Tensor:
        if self._spill_dir is None:
            parent = Path(self._spill_parent) if self._spill_parent else None
            if parent is not None:
                parent.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="mukv-blocks-", dir=parent))
        raw = t.detach().to("cpu").contiguous().view(torch.uint8).numpy()
        path = self._spill_dir / f"{block_id:08d}.{name}"
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=raw.shape)
        mm[...] = raw
        mm.flush()
        # Opened read-write (never written after this) so that torch gets a writable buffer.
        return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="r+", shape=raw.shape)).view(t.dtype)
