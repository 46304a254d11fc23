"""llm-bip: structured pruning of LLMs with the LLM-BIP block-output importance metric.

Importing the package registers the pruned (non-uniform) model classes with transformers' Auto
classes, so saved pruned models load with plain `AutoModelForCausalLM.from_pretrained`.
"""

from llm_bip import modeling_llm_bip  # noqa: F401  (registers the Auto classes)
from llm_bip.api import calibrate, evaluate, load, plan, prune, save, score
from llm_bip.errors import LlmBipError
from llm_bip.pipeline import PruneConfig, PruneResult
from llm_bip.plan import PruningPlan
from llm_bip.score_table import ScoreTable

__version__ = "0.1.0"

__all__ = [
    "LlmBipError", "PruneConfig", "PruneResult", "PruningPlan", "ScoreTable", "calibrate", "evaluate", "load",
    "plan", "prune", "save", "score",
]
