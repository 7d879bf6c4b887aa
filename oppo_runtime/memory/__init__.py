"""The shared page pool and per-model KV views."""
from .pool import KVGeometry, KVView, PagePool, PoolExhausted, pool_pages_from_free_memory

__all__ = ["KVGeometry", "KVView", "PagePool", "PoolExhausted", "pool_pages_from_free_memory"]
