"""One page pool shared by every model's KV cache.

The pool is a single device allocation of ``num_pages`` pages of ``page_bytes`` each. A model
registers its geometry (layers, KV heads, head dim, dtype) and gets a ``KVView``: per layer a K and
a V cache ``[num_pages, tokens_per_page, Hkv, D]`` that are strided views of the same bytes. One
page holds, for ``tokens_per_page`` tokens of one sequence, the K and V of every layer of that
model, laid out ``[layer][k|v][token][kv_head][dim]``. A page belongs to at most one
(model, sequence) at a time; pages freed by one model are used by any other.

The pool only allocates and accounts; who is preempted when pages run out is the engine's
policy (``PoolExhausted`` tells it). Invariants (checked by ``check()``, exercised by property
tests): free + owned = num_pages, no page has two owners, every owned page is listed exactly once.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["KVGeometry", "KVView", "PagePool", "PoolExhausted", "pool_pages_from_free_memory"]

log = logging.getLogger("oppo_runtime.memory")

Owner = tuple  # (model name, sequence id)


class PoolExhausted(RuntimeError):
    """Not enough free pages; the caller preempts something or waits."""


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.elem_size


def _pow2_floor(x: int) -> int:
    return 1 << (x.bit_length() - 1) if x > 0 else 0


class KVView:
    """A model's view of the pool: per layer (k_cache, v_cache), and its own tokens per page."""

    def __init__(self, pool: "PagePool", name: str, geometry: KVGeometry, tokens_per_page: int):
        self.pool, self.name, self.geometry = pool, name, geometry
        self.tokens_per_page = tokens_per_page
        self._caches = None
        self._generation = -1

    @property
    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._generation != self.pool.generation:
            self._caches = self._make_views()
            self._generation = self.pool.generation
        return self._caches

    def _make_views(self):
        g, T, pool = self.geometry, self.tokens_per_page, self.pool
        if pool.buffer is None:
            raise RuntimeError("the page pool's memory is released (training phase); call reacquire() first")
        es = g.elem_size
        base = pool.buffer.view(g.dtype)
        page_elems = pool.page_bytes // es
        row = g.num_kv_heads * g.head_dim
        size = (pool.num_pages, T, g.num_kv_heads, g.head_dim)
        stride = (page_elems, row, g.head_dim, 1)
        caches = []
        for layer in range(g.num_layers):
            k = base.as_strided(size, stride, (2 * layer) * T * row)
            v = base.as_strided(size, stride, (2 * layer + 1) * T * row)
            caches.append((k, v))
        return caches

    # convenience wrappers bound to this model
    def pages_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_page)

    def ensure(self, seq_id, num_tokens: int) -> list[int]:
        """Grow ``seq_id``'s page list to hold ``num_tokens`` tokens (all or nothing)."""
        need = self.pages_for_tokens(num_tokens) - len(self.pool.pages_of((self.name, seq_id)))
        if need > 0:
            self.pool.allocate((self.name, seq_id), need)
        return self.pool.pages_of((self.name, seq_id))

    def pages(self, seq_id) -> list[int]:
        return self.pool.pages_of((self.name, seq_id))

    def free(self, seq_id) -> int:
        return self.pool.free((self.name, seq_id))

    def block_table(self, seq_ids: list, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The block tables of ``seq_ids`` as one int64 array [B, width] and their page counts
        [B], from the pool's row mirror (no per-page Python work). Entries past a sequence's pages
        hold stale page ids or zeros: valid page indices, never read for its tokens."""
        return self.pool.table_rows(self.name, seq_ids, width)

    def slot(self, pages: list[int], position: int) -> int:
        return pages[position // self.tokens_per_page] * self.tokens_per_page + position % self.tokens_per_page


class PagePool:
    def __init__(self, num_pages: int, page_bytes: int, device: torch.device | str = "cpu"):
        if num_pages <= 0 or page_bytes <= 0 or page_bytes % 16:
            raise ValueError(f"PagePool: num_pages ({num_pages}) must be > 0 and page_bytes ({page_bytes}) "
                             "a positive multiple of 16")
        self.num_pages, self.page_bytes, self.device = num_pages, page_bytes, torch.device(device)
        self.buffer: torch.Tensor | None = torch.empty(num_pages * page_bytes, dtype=torch.uint8, device=self.device)
        self.generation = 0
        self._free: list[int] = list(range(num_pages - 1, -1, -1))   # pop() gives low ids first
        self._owner: list[Owner | None] = [None] * num_pages
        self._pages: dict[Owner, list[int]] = {}
        self.views: dict[str, KVView] = {}
        self._kept: tuple[list[int], torch.Tensor] | None = None
        self._lock = threading.Lock()      # the actor and the scorer thread allocate concurrently
        # Row mirror of _pages for building block tables with numpy: owner -> row of _table
        # (its pages in order in the first _count[row] columns). Rows of freed owners are reused.
        self._rows: dict[Owner, int] = {}
        self._free_rows: list[int] = []
        self._table = np.zeros((64, 64), dtype=np.int64)
        self._count = np.zeros(64, dtype=np.int64)

    # ---------------------------------------------------------------- models
    def register(self, name: str, geometry: KVGeometry, tokens_per_page: int | None = None) -> KVView:
        """A model's view; tokens per page = the largest power of two that fits a page."""
        if name in self.views:
            raise ValueError(f"PagePool: a model named {name!r} is already registered")
        fit = self.page_bytes // geometry.bytes_per_token
        T = tokens_per_page or _pow2_floor(fit)
        if T < 1 or T > fit:
            raise ValueError(f"PagePool: a page of {self.page_bytes} B holds {fit} tokens of model {name!r} "
                             f"({geometry.bytes_per_token} B/token); asked for {T}")
        if self.page_bytes % geometry.elem_size:
            raise ValueError("PagePool: page_bytes must be a multiple of the element size")
        view = KVView(self, name, geometry, T)
        self.views[name] = view
        return view

    @staticmethod
    def page_bytes_for(geometries: list[KVGeometry], tokens_per_page: int) -> int:
        """Page size that gives the largest geometry ``tokens_per_page`` tokens per page."""
        b = max(g.bytes_per_token for g in geometries) * tokens_per_page
        return -(-b // 16) * 16

    @classmethod
    def for_models(cls, models, device, tokens_per_page: int, num_pages: int | None = None,
                   memory_fraction: float | None = None) -> "PagePool":
        """A pool on ``device`` for the KV of ``models`` (objects with ``kv_geometry()`` and
        parameters; None entries are skipped): pages of ``tokens_per_page`` tokens of the largest
        geometry, ``num_pages`` of them, else ``memory_fraction`` of the device's free memory."""
        geoms = [KVGeometry(*m.kv_geometry(), next(m.parameters()).dtype) for m in models if m is not None]
        page_bytes = cls.page_bytes_for(geoms, tokens_per_page)
        if num_pages is None:
            if memory_fraction is None:
                raise ValueError("PagePool.for_models: give num_pages or memory_fraction")
            num_pages = pool_pages_from_free_memory(page_bytes, memory_fraction, torch.device(device))
        return cls(num_pages, page_bytes, device)

    # ---------------------------------------------------------------- pages
    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_of(self, owner: Owner) -> list[int]:
        return self._pages.get(owner, [])

    @property
    def page_lists(self) -> dict:
        """owner -> its page list, the pool's own dict (read it, never change it): a per-sequence
        ``dict.get`` for the scheduler's page check of every decode step, without a call per owner."""
        return self._pages

    def allocate(self, owner: Owner, n: int) -> list[int]:
        """Append ``n`` pages to ``owner`` (all or nothing); raises PoolExhausted."""
        with self._lock:
            if n > len(self._free):
                raise PoolExhausted(f"{owner}: needs {n} pages, {len(self._free)} free of {self.num_pages}")
            return self._take(owner, n)

    def allocate_many(self, owners: list[Owner], counts: list[int]) -> None:
        """Append ``counts[i]`` pages to ``owners[i]`` for every i under one lock (all or nothing:
        raises PoolExhausted, changing nothing, when the pages do not all fit)."""
        with self._lock:
            total = sum(counts)
            if total > len(self._free):
                raise PoolExhausted(f"{len(owners)} owners need {total} pages, {len(self._free)} free of "
                                    f"{self.num_pages}")
            for owner, n in zip(owners, counts):
                self._take(owner, n)

    def _take(self, owner: Owner, n: int) -> list[int]:
        """``n`` free pages to ``owner`` (the caller holds the lock and checked that they are free)."""
        got = [self._free.pop() for _ in range(n)]
        for p in got:
            self._owner[p] = owner
        self._pages.setdefault(owner, []).extend(got)
        self._mirror_append(owner, got)
        return got

    def _mirror_append(self, owner: Owner, got: list[int]) -> None:
        row = self._rows.get(owner)
        if row is None:
            if self._free_rows:
                row = self._free_rows.pop()
            else:
                row = len(self._rows)
                if row >= self._table.shape[0]:
                    grow = self._table.shape[0]
                    self._table = np.concatenate([self._table, np.zeros_like(self._table[:grow])])
                    self._count = np.concatenate([self._count, np.zeros(grow, dtype=np.int64)])
            self._rows[owner] = row
            self._count[row] = 0
        c = int(self._count[row])
        need = c + len(got)
        if need > self._table.shape[1]:
            cols = max(need, 2 * self._table.shape[1])
            self._table = np.concatenate(
                [self._table, np.zeros((self._table.shape[0], cols - self._table.shape[1]), dtype=np.int64)], axis=1)
        self._table[row, c:need] = got
        self._count[row] = need

    def _mirror_drop(self, owner: Owner) -> None:
        row = self._rows.pop(owner, None)
        if row is not None:
            self._count[row] = 0
            self._free_rows.append(row)

    def mirror_rows(self, model: str, seq_ids: list) -> np.ndarray:
        """int64 [len(seq_ids)]: the row of each owner (model, seq_id) in the table mirror, -1 for
        an owner without pages. A row stays the owner's until its pages are all freed or renamed,
        so a caller may keep it while it knows the owner keeps its pages (see table_at)."""
        get = self._rows.get
        with self._lock:
            return np.fromiter((get((model, s), -1) for s in seq_ids), dtype=np.int64, count=len(seq_ids))

    def table_at(self, rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """[len(rows), width] int64 page ids of the mirror's ``rows`` (from mirror_rows; -1: an
        owner without pages, whose row is zeros) and their page counts."""
        with self._lock:
            missing = rows < 0
            safe = np.where(missing, 0, rows)
            counts = np.where(missing, 0, self._count[safe])
            w = min(width, self._table.shape[1])
            table = np.zeros((len(rows), width), dtype=np.int64)
            table[:, :w] = self._table[safe, :w]
            if missing.any():
                table[missing] = 0
            return table, counts

    def page_counts_at(self, rows: np.ndarray) -> np.ndarray:
        """Page counts of the mirror's ``rows`` (all >= 0)."""
        with self._lock:
            return self._count[rows]

    def table_rows(self, model: str, seq_ids: list, width: int) -> tuple[np.ndarray, np.ndarray]:
        """[len(seq_ids), width] int64 page ids of owners (model, seq_id) (see KVView.block_table)
        and their page counts; an owner without pages has count 0 (its row is zeros)."""
        return self.table_at(self.mirror_rows(model, seq_ids), width)

    def free(self, owner: Owner) -> int:
        with self._lock:
            pages = self._pages.pop(owner, [])
            for p in pages:
                assert self._owner[p] == owner, f"page {p} owned by {self._owner[p]}, freed by {owner}"
                self._owner[p] = None
            self._free.extend(reversed(pages))
            self._mirror_drop(owner)
            return len(pages)

    def rename(self, owner: Owner, new_owner: Owner) -> int:
        """Hand ``owner``'s pages to ``new_owner`` (e.g. a quarantine until in-flight work ends)."""
        with self._lock:
            if new_owner in self._pages:
                raise ValueError(f"PagePool.rename: {new_owner} already owns pages")
            pages = self._pages.pop(owner, [])
            row = self._rows.pop(owner, None)
            if pages:
                for p in pages:
                    self._owner[p] = new_owner
                self._pages[new_owner] = pages
                self._rows[new_owner] = row
            elif row is not None:
                self._count[row] = 0
                self._free_rows.append(row)
            return len(pages)

    def owners(self) -> list[Owner]:
        return list(self._pages)

    def usage(self) -> dict[str, int]:
        """Pages held per model, plus 'free'. Sums to num_pages."""
        out: dict[str, int] = {name: 0 for name in self.views}
        for (model, _), pages in self._pages.items():
            out[model] = out.get(model, 0) + len(pages)
        out["free"] = len(self._free)
        return out

    def check(self) -> None:
        """Assert the accounting invariants (cheap enough for tests, not for hot paths)."""
        seen = set()
        for owner, pages in self._pages.items():
            for p in pages:
                assert p not in seen, f"page {p} listed twice"
                assert self._owner[p] == owner, f"page {p}: owner {self._owner[p]} != {owner}"
                seen.add(p)
        assert set(self._rows) == set(self._pages), "row mirror owners differ from the page lists"
        for owner, pages in self._pages.items():
            row = self._rows[owner]
            assert self._count[row] == len(pages) and self._table[row, :len(pages)].tolist() == pages, \
                f"row mirror of {owner} differs from its pages"
        assert len(set(self._rows.values())) == len(self._rows), "two owners share a mirror row"
        free = set(self._free)
        assert len(free) == len(self._free), "a page is free twice"
        assert not (free & seen), "a page is both free and owned"
        assert len(free) + len(seen) == self.num_pages, "pages leaked"

    # ---------------------------------------------------------------- training phase
    def release(self, keep: list[Owner] | None = None) -> None:
        """Give the pool's memory back (training phase), keeping the pages of ``keep`` owners.

        Kept pages are copied to a compact buffer and restored to the same page ids by
        ``reacquire()``, so the block tables of in-flight sequences stay valid. Pages of every
        other owner are freed.
        """
        if self.buffer is None:
            return
        keep = [o for o in (keep or []) if o in self._pages]
        for owner in [o for o in self._pages if o not in keep]:
            self.free(owner)
        ids = [p for o in keep for p in self._pages[o]]
        idx = torch.tensor(ids, dtype=torch.long, device=self.device)
        saved = self.buffer.view(self.num_pages, self.page_bytes).index_select(0, idx)
        self._kept = (ids, saved)
        self.buffer = None
        self.generation += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("page pool released; kept %d pages of %d owners", len(ids), len(keep))

    def reacquire(self) -> None:
        if self.buffer is not None:
            return
        self.buffer = torch.empty(self.num_pages * self.page_bytes, dtype=torch.uint8, device=self.device)
        ids, saved = self._kept
        if ids:
            idx = torch.tensor(ids, dtype=torch.long, device=self.device)
            self.buffer.view(self.num_pages, self.page_bytes).index_copy_(0, idx, saved)
        self._kept = None
        self.generation += 1


def pool_pages_from_free_memory(page_bytes: int, fraction: float, device: torch.device) -> int:
    """Pages that fit in ``fraction`` of the device memory free now (call after a warm-up pass)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"memory fraction must be in (0, 1], got {fraction}")
    if device.type != "cuda":
        raise ValueError("sizing from free memory needs a CUDA device; give num_pages on the CPU")
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * fraction) // page_bytes)
