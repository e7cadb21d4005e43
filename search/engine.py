"""The allocation search: an Optuna study whose trials are per-layer allocations meeting the budget exactly.

One process (or each of ``workers`` processes) holds a ``Workspace``: the model, the weight ranks of the
score-based pruner and the dense reference log-probabilities, all computed once and cached under the run
folder. A trial samples one sparsity per unit, projects it onto the budget, writes the masked weights and
measures KL to the dense model on held-out tokens: first on a few sequences (Optuna's pruner stops the poor
ones), then on all.

A budget range (``sparsity=0.6:0.8``) makes the study multi-objective: each trial also samples its budget, one of
21 evenly spaced levels across the range (so trials and seeds share exact budgets and stay comparable), and the
run keeps the Pareto front of fitness against sparsity instead of one best allocation.

The parts, one job each, imports running downward: ``search.settings`` (the study's settings and defaults) ←
``search.workspace`` (what one process holds; realize and measure) ← ``search.results`` (trials frame, best
config or Pareto front, report; ``search.selection`` re-measures the best few pruned for real to pick the answer)
← ``search.study`` (storage, seeds, the block-drop scan of ``search.drops``, workers, resume, ``run_search``). With
``--space width`` the workspace is ``search.width_workspace.WidthWorkspace`` (``search.width_space``,
``search.width_realizer``), picked by ``open_workspace``. This module re-exports their public names.
"""

from search.drops import drop_scan
from search.results import finish, trials_frame
from search.selection import Selection, default_selection
from search.settings import (BOUND_WIDTH, EFFORT, LEVEL_PARAM, PRUNERS, RANGE_LEVELS, SearchSettings, default_effort,
                             default_stats_inputs)
from search.study import check_run_folder, enqueue_seeds, open_study, open_workspace, optimize, run_search
from search.workspace import Workspace

__all__ = [
    "BOUND_WIDTH", "EFFORT", "LEVEL_PARAM", "PRUNERS", "RANGE_LEVELS", "SearchSettings", "Selection", "Workspace",
    "check_run_folder", "default_effort", "default_selection", "default_stats_inputs", "drop_scan", "enqueue_seeds",
    "finish", "open_study", "open_workspace", "optimize", "run_search", "trials_frame",
]
