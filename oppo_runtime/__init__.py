"""oppo-runtime: a paged-KV inference runtime that overlaps the PPO pipeline (OPPO)."""
__version__ = "0.1.0"
__all__ = ["__version__"]
# embedding API (issue 9): the rollout stage for another trainer's PPO loop
from .api import Experiences, OPPORollout, RuleReward, SamplingParams  # noqa: E402
__all__ += ["OPPORollout", "Experiences", "SamplingParams", "RuleReward"]
