"""`llm-bip compare`: methods × ratios on one model and one calibration set, in one table and a few plots.

A method is a recipe: a scorer, an allocator, a compensation and a calibration mode. Scores are computed
once per scorer (a `ScoreTable`) and re-planned for every ratio on a fresh copy of the dense model;
recipes that share a scorer (llm-bip, llm-bip+bias) share its table. Sequential recipes (Wanda-sp, as
its source prunes a layer before computing the next one's inputs) cannot reuse scores: they score
while they prune, once per ratio.

    llm-bip compare --methods llm-bip flap wanda-sp taylor magnitude random --ratios 0.1 0.2 0.3 0.5 \\
        --eval wikitext2 --eval-seq-len 128 2048 --output compare/

A method may carry overrides: `llm-bip:allocation=global-adaptive,compensation=refit`.

Cost: scoring wall time, and peak resident memory above what the process held just before scoring
(the loaded model, its calibration samples and the dense copy). Peak RSS is measured in-process: freed
heap is handed back to the OS (malloc_trim), the kernel's high-water mark is reset through
/proc/self/clear_refs and read back as VmHWM afterwards; where that is not possible a 5 ms sampling
thread reads VmRSS instead. Each result says which.
"""

from llm_bip.compare.cli import add_arguments, add_compare_parser, cmd_compare, main_compare
from llm_bip.compare.memory import PeakMemory
from llm_bip.compare.recipes import DEFAULT_METHODS, RECIPES, CompareConfig, Recipe, parse_method
from llm_bip.compare.report import CompareResult, write_outputs
from llm_bip.compare.run import check_runnable, compare

__all__ = ["DEFAULT_METHODS", "RECIPES", "CompareConfig", "CompareResult", "PeakMemory", "Recipe", "add_arguments",
           "add_compare_parser", "check_runnable", "cmd_compare", "compare", "main_compare", "parse_method",
           "write_outputs"]
