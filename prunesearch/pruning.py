"""Prune a model to a per-layer config and save it: the path ``prunesearch prune`` and ``realize`` share."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pruners.targets import SparsityConfig

if TYPE_CHECKING:
    from pruners.width.prune import Allocator


@dataclass
class PruneJob:
    """One one-shot pruning: the target config, the method and its options, the model and the protocol."""

    config: SparsityConfig | Allocator  # per-layer sparsity targets; for method width, what picks the widths
    method: str
    options: dict = field(default_factory=dict)  # the method's own: {"wbits": 4}; width: score, bias_compensation
    model: str | None = None  # None: the built-in default model
    device: str = "cpu"
    dtype: str = "auto"
    calib: str = "c4"
    nsamples: int = 128
    seed: int = 0
    seqlen: int | None = None
    batch_size: int = 8
    data_dir: str | None = None
    width: tuple[Allocator, str] | None = None  # slice to these widths (picked with this width score) first


def _protocol(job: PruneJob, source: str, model, seqlen: int, calibrated: bool) -> dict:
    """How a pruning was done: model, calibration data (None when the method needs none), device and dtype."""
    from prunesearch import data
    from prunesearch.models import describe_model

    return {"model": describe_model(source), "calib": data.describe(job.calib, job.data_dir) if calibrated else None,
            "nsamples": job.nsamples if calibrated else 0, "seqlen": seqlen, "seed": job.seed, "device": job.device,
            "dtype": str(next(model.parameters()).dtype)}


def run_prune(job: PruneJob, log: Callable[[str], None] = lambda msg: None):
    """Load the model, prune it in place to ``job.config``; returns (model on CPU, tokenizer, report) where the
    report holds the method, per-layer sparsity (or widths and counts), protocol and timings."""
    from prunesearch import data
    from prunesearch.models import default_seqlen, load_model
    from pruners.oneshot import global_sparsity, make_pruner, prune_model
    from pruners.registry import layout

    if job.method == "width":
        return _run_width(job, log)
    pruner = make_pruner(job.method, **job.options)
    timings = {}
    t = time.perf_counter()
    model, tokenizer, source = load_model(job.model, "cpu", job.dtype, compute_device=job.device)
    timings["load"] = time.perf_counter() - t
    targets = job.config.resolve(layout(model))
    seqlen = default_seqlen(model, job.seqlen, builtin=job.model is None)
    calib = None
    t = time.perf_counter()
    if pruner.stats is not None or job.width is not None:
        calib = data.calibration_ids(tokenizer, job.calib, job.nsamples, seqlen, job.seed, job.data_dir)
    timings["calibration_data"] = time.perf_counter() - t
    sliced = None
    if job.width is not None:
        from pruners.width.prune import prune_width

        log(f"width-pruning {source} ({job.width[1]} scores) on {job.device}")
        sliced = prune_width(model, calib, job.width[0], job.width[1], False, job.device, job.batch_size)
        timings["slice"] = sliced.pop("prune_seconds")
        targets = job.config.resolve(layout(model))  # the sliced model's projections
    log(f"pruning {source} with {job.method} on {job.device}")
    result = prune_model(model, pruner, targets, calib, device=job.device, batch_size=job.batch_size)
    timings["prune"] = result["prune_seconds"]
    report = {
        "method": job.method, "model": source, "config": job.config.to_dict(), "wbits": job.options.get("wbits"),
        "global_sparsity": global_sparsity(result["layers"]), "layers": result["layers"],
        "protocol": _protocol(job, source, model, seqlen, calib is not None), "timings_s": timings,
    }
    if "details" in result:
        report["method_details"] = result["details"]
    if sliced is not None:
        report |= {"width": sliced, "nonzero_params": nonzero_params(model)}
    return model, tokenizer, report


def nonzero_params(model) -> int:
    """Parameters of the model less the zero weights of its prunable projections (what a params= budget counts)."""
    from pruners.registry import get_weight, layout

    lay = layout(model)
    zeros = sum(int((get_weight(m) == 0).sum()) for block in lay.projections for m in block.values())
    return sum(p.numel() for p in model.parameters()) - zeros


def _run_width(job: PruneJob, log: Callable[[str], None]):
    """``run_prune`` for method width: score the units, let ``job.config`` allocate the widths, slice the model;
    the report holds per-layer widths, parameters/FLOPs/memory before and after, the score and the protocol."""
    from prunesearch import data
    from prunesearch.models import default_seqlen, load_model
    from pruners.width.prune import prune_width

    score, bias = job.options.get("score", "flap"), bool(job.options.get("bias_compensation"))
    timings = {}
    t = time.perf_counter()
    model, tokenizer, source = load_model(job.model, "cpu", job.dtype, compute_device=job.device)
    timings["load"] = time.perf_counter() - t
    seqlen = default_seqlen(model, job.seqlen, builtin=job.model is None)
    t = time.perf_counter()
    calib = data.calibration_ids(tokenizer, job.calib, job.nsamples, seqlen, job.seed, job.data_dir)
    timings["calibration_data"] = time.perf_counter() - t
    log(f"width-pruning {source} ({score} scores) on {job.device}")
    result = prune_width(model, calib, job.config, score, bias, job.device, job.batch_size)
    timings["prune"] = result.pop("prune_seconds")
    report = {"method": "width", "model": source, **result,
              "protocol": _protocol(job, source, model, seqlen, True), "timings_s": timings}
    return model, tokenizer, report


def save_folder(out: Path, write: Callable[[Path], None], report_name: str, report: dict, kind: str) -> None:
    """Write a model folder beside ``out`` and swap it in (``prunesearch.safety.output_folder``): ``write(tmp)``
    saves the weights, then the report (with its save time)."""
    from prunesearch.safety import output_folder

    t = time.perf_counter()
    with output_folder(out, kind) as tmp:
        write(tmp)
        report.setdefault("timings_s", {})["save"] = time.perf_counter() - t
        (tmp / report_name).write_text(json.dumps(report, indent=2))
