"""oppo-runtime: a paged-KV inference runtime that overlaps the PPO pipeline (OPPO)."""
__version__ = "0.1.0"
__all__ = ["__version__"]
