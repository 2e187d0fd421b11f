"""A store of KV blocks for one video: host memory (pinned on CUDA), spilling to disk past a RAM budget.

A block is a run of tokens kept together: a frame for ReKV; a patch, frame or segment (after trimming)
for MuKV. It holds every layer's un-rotated keys and values, (layers, kv_heads, tokens, head_dim), the
positions its tokens were encoded at, and what part of the video it covers. Byte accounting is exact:
2 x layers x kv_heads x head_dim x element size per token, or the quantized codes and scales
(``quant='int8' | 'int4'``, :mod:`mukv.cache.quant`; dequantized on the device a question uses them on).

Blocks added from an accelerator are staged: their KV stays on the device until ``flush`` (the methods call
it at the end of each ingest; reading ``blocks`` or any KV flushes first), which moves every staged block
in one copy per dtype. On a GPU, a copy per block made the host wait for the device hundreds of times per
chunk (MuKV stores ~5 blocks per frame), and that wait, not the arithmetic, set MuKV's encoding speed.

``layers_kv`` hands the recalled blocks out layer by layer; with ``prefetch`` a worker thread gathers
(and reads from disk, moves, dequantizes) layer l+1 while the caller works on layer l. The worker issues
its copies on the caller's current CUDA stream, so ordering is the same as without it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Optional, TypeVar

import numpy as np
import torch

from mukv.cache.instrumentation import mark_host
from mukv.cache.quant import QUANT_MODES, KVQuant, QuantizedTensor, check_quant, dequantize, quantize
from mukv.errors import ConfigError

log = logging.getLogger("mukv")


@dataclass
class Block:
    id: int
    k: torch.Tensor | QuantizedTensor  # (layers, kv_heads, n, head_dim), un-rotated
    v: torch.Tensor | QuantizedTensor
    positions: torch.Tensor  # (n,) positions the tokens were encoded at
    first_frame: float  # the first frame it covers (fractional for sub-frame blocks)
    num_frames: float
    on_disk: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.k.shape[2])

    @classmethod
    def of_batch(cls, block_id: int, batch: _Batch, row: int, first_frame: float, num_frames: float) -> Block:
        """A block that is row ``row`` of ``batch`` (``BlockStore.add_many``): its k, v, positions and meta are
        taken from the batch when first read (at a question), not while the stream is encoded."""
        block = cls.__new__(cls)
        block.id, block.first_frame, block.num_frames, block.on_disk = block_id, first_frame, num_frames, False
        block._source = (batch, row)
        return block

    def __getattr__(self, name: str) -> Any:  # only for members not set yet: those of a block of a batch
        source = self.__dict__.get("_source")
        if source is None or name not in ("k", "v", "positions", "meta"):
            raise AttributeError(name)
        batch, row = source
        self.k, self.v, self.positions = batch.k[row], batch.v[row], batch.positions[row]
        self.meta = {key: m[row] for key, m in batch.meta_lists().items()}
        del self.__dict__["_source"]
        return self.__dict__[name]


@dataclass
class _Batch:
    """Blocks added together (``BlockStore.add_many``): (B, ...) tensors, moved to the host as a whole."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor  # (B, n)
    meta: dict[str, Any]  # name -> (B, ...) tensor or a list of B values
    _lists: dict[str, list] | None = None

    def meta_lists(self) -> dict[str, list]:
        if self._lists is None:
            self._lists = {key: m.tolist() if isinstance(m, torch.Tensor) else list(m) for key, m in self.meta.items()}
        return self._lists

    @property
    def nbytes(self) -> int:
        return _nbytes(self.k) + _nbytes(self.v)


def _nbytes(t: torch.Tensor | QuantizedTensor) -> int:
    return t.nbytes if isinstance(t, QuantizedTensor) else int(t.numel() * t.element_size())


class BlockStore:
    """Blocks of one video in host memory; beyond ``ram_budget_bytes`` new blocks go to memory-mapped
    files under ``spill_dir`` (a temporary folder by default, removed by ``clear``; one left by a killed
    process is removed by the next run that spills there, ``clean_stale_spill_dirs``). ``quant`` stores them
    as int8 / int4 codes with a float16 scale per ``group_size`` values."""

    stage_host_blocks = False  # stage blocks added from host tensors too (tests run the GPU path on a CPU)

    def __init__(self, pin_memory: bool = False, ram_budget_bytes: int | None = None,
                 spill_dir: str | Path | None = None, quant: str = "none", group_size: int = 64,
                 prefetch: bool = False) -> None:
        err = check_quant(quant, group_size)
        if err:
            raise ValueError(err)
        self.quant, self.group_size, self.prefetch = quant, group_size, prefetch
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.ram_budget_bytes = ram_budget_bytes
        self._spill_parent = spill_dir
        self._spill_dir: Path | None = None
        self._blocks: list[Block] = []
        self._staged: list[Block] = []  # added from a device, not yet moved to host memory (see flush)
        self._staged_batches: list[_Batch] = []  # the same, added together (add_many)
        self._tokens = 0
        self._staged_bytes = 0
        # flushed blocks whose device-to-host copy may still run: (CUDA event or None, blocks, copy sources)
        self._landing: list[tuple[Any, list[Block], list[torch.Tensor]]] = []
        self.stage_limit_bytes = 1 << 30  # flush by itself past this much staged KV
        self.ram_bytes = 0
        self.disk_bytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def blocks(self) -> list[Block]:
        """Every block, in insertion order, in host memory or on disk (staged blocks are flushed first, and
        landed)."""
        self.flush()
        self._land(wait=True)
        return self._blocks

    @property
    def nbytes(self) -> int:
        return self.ram_bytes + self.disk_bytes

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def spill_dir(self) -> Path | None:
        return self._spill_dir

    def add(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None,
            first_frame: float = 0.0, num_frames: float = 1.0, meta: dict[str, Any] | None = None) -> int:
        """Store one block (all layers); returns its id (0, 1, ... in insertion order). Device tensors are
        staged, not copied: the caller must not write to them before the next ``flush``."""
        n = k.shape[2]
        if positions is None:
            positions = torch.arange(n)
        if self.quant != "none":
            k, v = quantize(k, self.quant, self.group_size), quantize(v, self.quant, self.group_size)
        size = _nbytes(k) + _nbytes(v)
        spill = self.ram_budget_bytes is not None and self.ram_bytes + size > self.ram_budget_bytes
        if spill:
            self.disk_bytes += size
        else:
            self.ram_bytes += size
        block = Block(len(self._blocks), k, v, positions.detach().to(torch.long), first_frame, num_frames, spill,
                      dict(meta or {}))
        self._blocks.append(block)
        self._tokens += n
        if _leaves(k)[0].device.type == "cpu" and not self.stage_host_blocks:
            self._settle(block)
        else:
            self._staged.append(block)
            self._staged_bytes += size
            if self._staged_bytes > self.stage_limit_bytes:
                self.flush()
        return block.id

    def add_many(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, first_frames: list[float],
                 num_frames: float | list[float], meta: dict[str, Any] | None = None) -> list[int]:
        """Store B blocks of equal size at once: k and v (B, layers, kv_heads, n, head_dim), positions (B, n), meta
        values (B, ...) tensors or lists of B; ``num_frames`` one for all or a list. The same blocks as B ``add`` calls; from a device, with a few
        operator calls for all of them (each call is host time on a GPU) and none per block, whose views are
        taken when first read. Quantized or spilling stores, and host tensors, go block by block."""
        b, n = int(k.shape[0]), int(k.shape[3])
        meta = dict(meta or {})
        spans = list(num_frames) if isinstance(num_frames, (list, tuple)) else [num_frames] * b
        size = 2 * math.prod(k.shape[1:]) * k.element_size()
        per_block = (self.quant != "none" or (k.device.type == "cpu" and not self.stage_host_blocks)
                     or (self.ram_budget_bytes is not None and self.ram_bytes + b * size > self.ram_budget_bytes))
        if per_block:
            return [self.add(k[i], v[i], positions[i], first_frames[i], spans[i],
                             {key: m[i] for key, m in meta.items()}) for i in range(b)]
        batch = _Batch(k, v, positions.detach().to(torch.long), meta)
        first = len(self._blocks)
        self._blocks += [Block.of_batch(first + i, batch, i, first_frames[i], spans[i]) for i in range(b)]
        self.ram_bytes += b * size
        self._tokens += b * n
        self._staged_batches.append(batch)
        self._staged_bytes += b * size
        if self._staged_bytes > self.stage_limit_bytes:
            self.flush()
        return list(range(first, first + b))

    def flush(self) -> None:
        """Move the staged blocks to host memory (or disk): one device-to-host copy per dtype for all of them.

        On CUDA the copy goes into pinned memory without the host waiting for it: the blocks land (their metadata
        read, spills written) once a CUDA event says the copy is done, checked at the next flush without
        waiting, or waited for when a block is read (``blocks``, at a question). So a chunk's encoding never
        waits for the device."""
        self._land(wait=False)
        if not self._staged and not self._staged_batches:
            return
        staged, self._staged, self._staged_bytes = self._staged, [], 0
        batches, self._staged_batches = self._staged_batches, []
        tensors = []
        for b in staged:
            tensors += _leaves(b.k) + _leaves(b.v) + [b.positions]
            tensors += [m for m in b.meta.values() if isinstance(m, torch.Tensor)]
        for batch in batches:
            tensors += [batch.k, batch.v, batch.positions]
            tensors += [m for m in batch.meta.values() if isinstance(m, torch.Tensor)]
        host: dict[int, torch.Tensor] = {}
        sources = []
        for device, dtype in {(t.device, t.dtype) for t in tensors}:
            group = [t for t in tensors if t.device == device and t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            buf = torch.empty(flat.shape, dtype=dtype, pin_memory=self.pin_memory)
            mark_host(buf)
            buf.copy_(flat, non_blocking=True)  # pinned: asynchronous on CUDA (landed by _land)
            sources.append(flat)  # alive until the copy is done
            offset = 0
            for t in group:
                host[id(t)] = buf[offset:offset + t.numel()].view(t.shape)
                mark_host(host[id(t)])
                offset += t.numel()
        for b in staged:
            b.k = _map_leaves(b.k, lambda t: host[id(t)])
            b.v = _map_leaves(b.v, lambda t: host[id(t)])
            b.positions = host[id(b.positions)]
            b.meta = {key: host[id(m)] if isinstance(m, torch.Tensor) else m for key, m in b.meta.items()}
        for batch in batches:  # its blocks take their rows when first read
            batch.k, batch.v, batch.positions = host[id(batch.k)], host[id(batch.v)], host[id(batch.positions)]
            batch.meta = {key: host[id(m)] if isinstance(m, torch.Tensor) else m for key, m in batch.meta.items()}
        event = None
        if self.pin_memory and any(t.device.type == "cuda" for t in sources):
            event = torch.cuda.Event()
            event.record()
        self._landing.append((event, staged, sources))
        self._land(wait=False)

    def _land(self, wait: bool) -> None:
        """Settle the flushed blocks whose copy is done (all of them if ``wait``: the host then waits for it)."""
        while self._landing:
            event, staged, _ = self._landing[0]
            if event is not None and not wait and not event.query():
                return
            if event is not None:
                event.synchronize()
            self._landing.pop(0)
            for b in staged:
                self._settle(b, owned=True)

    def _settle(self, block: Block, owned: bool = False) -> None:
        """Give a block its final home: host memory, or a file when it spilled. ``owned``: its tensors are
        already the store's own host copies (slices of a flush buffer), kept as they are unless spilled."""
        if block.on_disk:
            block.k, block.v = self._to_disk(block.k, block.id, "k"), self._to_disk(block.v, block.id, "v")
        elif not owned:
            block.k, block.v = self._to_host(block.k), self._to_host(block.v)
        block.positions = block.positions.to("cpu")
        block.meta = {key: m.tolist() if isinstance(m, torch.Tensor) else m for key, m in block.meta.items()}

    def layer_kv(self, ids: list[int], layer: int, device: torch.device | str,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``ids`` (in that order) for one layer: (1, kv_heads, sum n, head_dim)."""
        return self._gather([b.k for b in self._take(ids)], layer, device, dtype), \
            self._gather([b.v for b in self._take(ids)], layer, device, dtype)

    def layers_kv(self, ids: list[int], num_layers: int, device: torch.device | str,
                  dtype: torch.dtype | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``layer_kv`` for layers 0..num_layers-1 in turn; with ``prefetch`` the next layer is prepared by
        a worker thread while the caller uses the current one (same values either way)."""
        self.flush()  # here, not in the prefetch worker
        if not self.prefetch or num_layers < 2:
            for layer in range(num_layers):
                yield self.layer_kv(ids, layer, device, dtype)
            return
        stream = torch.cuda.current_stream() if torch.device(device).type == "cuda" else None

        def load(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
            if stream is None:
                return self.layer_kv(ids, layer, device, dtype)
            with torch.cuda.stream(stream):
                return self.layer_kv(ids, layer, device, dtype)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mukv-prefetch") as pool:
            pending = pool.submit(load, 0)
            for layer in range(num_layers):
                current = pending.result()
                if layer + 1 < num_layers:
                    pending = pool.submit(load, layer + 1)
                yield current

    def _take(self, ids: list[int]) -> list[Block]:
        blocks = self.blocks
        return [blocks[i] for i in ids]

    def _gather(self, parts: list, layer: int, device, dtype) -> torch.Tensor:
        if self.quant == "none":
            return torch.cat([p[layer] for p in parts], dim=1)[None].to(device, dtype=dtype, non_blocking=True)
        codes = torch.cat([p.codes[layer] for p in parts], dim=1).to(device, non_blocking=True)
        scales = torch.cat([p.scales[layer] for p in parts], dim=1).to(device, non_blocking=True)
        q = QuantizedTensor(codes, scales, self.quant, self.group_size, parts[0].dtype)
        return dequantize(q, dtype)[None]

    def positions(self, ids: list[int]) -> torch.Tensor:
        blocks = self.blocks
        return torch.cat([blocks[i].positions for i in ids]) if ids else torch.empty(0, dtype=torch.long)

    def clear(self) -> None:
        """Drop every block and remove spill files."""
        self._blocks.clear()
        self._land(wait=True)
        self._staged.clear()
        self._staged_batches.clear()
        self._staged_bytes = 0
        self._tokens = 0
        self.ram_bytes = self.disk_bytes = 0
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def __del__(self) -> None:
        if getattr(self, "_spill_dir", None) is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------ internals
    def _to_host(self, t: torch.Tensor | QuantizedTensor) -> torch.Tensor | QuantizedTensor:
        if isinstance(t, QuantizedTensor):
            return t.map(self._to_host)
        host = t.detach().to("cpu").contiguous()
        if host.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            host = host.clone()  # never keep the caller's storage
        return host.pin_memory() if self.pin_memory else host

    def _to_disk(self, t: torch.Tensor | QuantizedTensor, block_id: int, name: str):
        if isinstance(t, QuantizedTensor):
            return QuantizedTensor(self._to_disk(t.codes, block_id, f"{name}.codes"),
                                   self._to_disk(t.scales, block_id, f"{name}.scales"), t.mode, t.group_size, t.dtype)
        if self._spill_dir is None:
            parent = Path(self._spill_parent) if self._spill_parent else None
            if parent is not None:
                parent.mkdir(parents=True, exist_ok=True)
            self._spill_dir = make_spill_dir(parent)
        raw = t.detach().to("cpu").contiguous().view(torch.uint8).numpy()
        path = self._spill_dir / f"{block_id:08d}.{name}"
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=raw.shape)
        mm[...] = raw
        mm.flush()
        # Opened read-write (never written after this) so that torch gets a writable buffer.
        return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="r+", shape=raw.shape)).view(t.dtype)


SPILL_PREFIX = "mukv-blocks-"
SPILL_OWNER = "owner.json"
_cleaned_parents: set[str] = set()


def make_spill_dir(parent: Path | None) -> Path:
    """A new spill folder ``mukv-blocks-<pid>-*`` under ``parent`` (the temporary folder by default) that
    names its owner (``owner.json``: pid, host, start), so that a later run can tell it was left behind."""
    import json

    from mukv.resume import holder_info

    folder = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=parent))
    (folder / SPILL_OWNER).write_text(json.dumps(holder_info()))
    return folder


def clean_stale_spill_dirs(parent: str | Path | None = None) -> list[Path]:
    """Remove the spill folders under ``parent`` (default: the temporary folder) that a process of this host
    made and left behind when it died (a SIGKILL skips clean-up); returns them. Only folders named
    ``mukv-blocks-*`` holding an ``owner.json`` whose process is gone are touched."""
    import json

    from mukv.resume import process_alive

    folder = Path(parent) if parent else Path(tempfile.gettempdir())
    removed = []
    for d in sorted(folder.glob(f"{SPILL_PREFIX}*")) if folder.is_dir() else ():
        try:
            owner = json.loads((d / SPILL_OWNER).read_text())
            mine = d.is_dir() and not d.is_symlink() and owner.get("host") == socket.gethostname()
        except (OSError, ValueError, AttributeError):
            continue  # not ours to judge: no owner file (yet), or another layout
        if mine and not process_alive(owner.get("pid", -1), owner.get("start")):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if removed:
        log.warning("removed %d spill folder(s) left by runs that died: %s", len(removed),
                    ", ".join(str(d) for d in removed))
    return removed


def _check_writable_dir(folder: str, name: str) -> None:
    """Create ``folder`` if needed and write a probe file in it (``os.access`` would pass a read-only mount or
    root's view of a read-only folder); a failure is a ``ConfigError`` naming ``name``."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"0")
    except OSError as err:
        raise ConfigError(name, f"cannot write to '{folder}': {err.strerror or err}") from None


def _leaves(t: torch.Tensor | QuantizedTensor) -> list[torch.Tensor]:
    return [t.codes, t.scales] if isinstance(t, QuantizedTensor) else [t]


def _map_leaves(t: torch.Tensor | QuantizedTensor, fn) -> torch.Tensor | QuantizedTensor:
    return t.map(fn) if isinstance(t, QuantizedTensor) else fn(t)


@dataclass
class StoreOptions:
    """Block-store knobs shared by the methods that offload KV (ReKV, MuKV): ``cache.<name>`` in configs."""

    pin_memory: bool = True  # pinned host memory for offloaded blocks when on CUDA
    ram_budget_gb: Optional[float] = None  # spill blocks to disk beyond this much host memory
    spill_dir: Optional[str] = None
    kv_quant: KVQuant = KVQuant.none  # none (published) | int8 | int4: stored blocks quantized, see mukv.cache.quant
    kv_quant_group_size: int = 64  # values per float16 scale (along the head dimension)
    prefetch: bool = False  # prepare layer l+1's recalled blocks while layer l is used

    def validate_store(self, head_dim: int) -> None:
        budget = self.ram_budget_gb
        if budget is not None and (not math.isfinite(budget) or budget < 0):  # inf overflowed int() at the 1st block
            raise ConfigError("cache.ram_budget_gb", f"must be a finite number >= 0 or null, got {budget}")
        if budget is not None and self.spill_dir:  # spilling writes here: find out now, not mid-video
            _check_writable_dir(self.spill_dir, "cache.spill_dir")
        err = check_quant(self.kv_quant, self.kv_quant_group_size, head_dim)
        if err:
            field_name = "cache.kv_quant" if self.kv_quant not in QUANT_MODES else "cache.kv_quant_group_size"
            raise ConfigError(field_name, err)

    def new_store(self, device: torch.device) -> BlockStore:
        budget = None if self.ram_budget_gb is None else int(self.ram_budget_gb * 1e9)
        parent = str(self.spill_dir or tempfile.gettempdir())
        if budget is not None and parent not in _cleaned_parents:  # once per process: the first video's store
            _cleaned_parents.add(parent)
            clean_stale_spill_dirs(parent)
        return BlockStore(self.pin_memory and device.type == "cuda", budget, self.spill_dir, self.kv_quant,
                          self.kv_quant_group_size, self.prefetch)


S = TypeVar("S")  # a method's per-video state (it has a ``store``)


class VideoStoreState(Generic[S]):
    """Accessors of a method whose per-video state (``self._video``, made by ``start_video``) holds its block
    store (ReKV, MuKV): ``video`` refuses use before ``start_video``, ``store`` is the state's store."""

    _video: S | None = None

    @property
    def video(self) -> S:
        """The current video's state (``start_video`` makes it)."""
        if self._video is None:
            raise RuntimeError(f"{type(self).__name__}: start_video() before ingesting or recalling")
        return self._video

    @property
    def store(self) -> BlockStore:
        """The current video's block store."""
        return self.video.store  # type: ignore[attr-defined]
