"""Width pruning: score attention heads (in whole key/value groups) and MLP channels, then remove them for real.

``geometry`` reads a model's per-layer widths, ``importance`` scores units from one calibration walk, ``allocation``
turns a share or a ranking into per-layer widths, ``slicing`` removes (or masks) units, ``export`` saves models
that reload through ``AutoModelForCausalLM`` and ``counting`` gives parameters, FLOPs and memory of a width.
"""
