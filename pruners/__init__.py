"""One-shot pruners and the machinery they share.

A pruner turns (weight, calibration statistics, target) into a pruned weight. The walk over a model's blocks
lives once in ``pruners.walker``; where blocks and projections sit in each model family lives once in
``pruners.registry``; per-layer targets are parsed in ``pruners.targets``.
"""
