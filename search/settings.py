"""The settings that define a study (``SearchSettings``), checked once before anything loads, the pruners a search
can realize fast (``PRUNERS``, the searchable methods of ``pruners.methods``) and the defaults a search measures
with when the user gives none (``EFFORT``, the per-unit bounds, the budget-range levels)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from dataclasses import dataclass, field

from pruners.methods import METHODS, get_method, names
from prunesearch.safety import UserError

LEVEL_PARAM = "budget_level"  # a multi-objective trial's budget: level k of RANGE_LEVELS steps across the range
RANGE_LEVELS = 20
PRUNERS = tuple(names(searchable=True))
SPACES = ("sparsity", "width", "both")
DROP_SCAN = ("auto", "on", "off")
# Where the pruner's statistics for the search's ranks or level database come from: the dense model's inputs to
# every block, or inputs through the earlier blocks pruned uniformly at the budget (as realizing sees them), or -
# for Wanda and GBLM - the candidate's own pruned blocks: every candidate pruned for real, sequentially, on the first
# ``candidate_nsamples`` calibration sequences (``search.scores.SequentialRealizer``). The default depends on the
# realizer, as measured on SmolLM2-135M at 70% (README): the SparseGPT level database reads allocations far worse
# than they realize from dense inputs (WikiText-2 PPL of the searched allocation 413 dense, 342 pruned), while
# Wanda's ranks are better from dense inputs (401 dense, 427 pruned) and better still with no proxy at all, the
# default for Wanda and GBLM on models other than the built-in one (``default_stats_inputs``).
STATS_INPUTS = ("dense", "pruned", "candidate")
DEFAULT_STATS_INPUTS = {"ranks": "dense", "levels": "pruned"}
CANDIDATE_NSAMPLES = 8  # per candidate; orders allocations as all 32 do (candidate_inputs-smollm2-wanda-70.md)
# Default per-unit bounds: budget ± BOUND_WIDTH, inside [0, 0.99]. The best allocations of a real model span wide:
# SmolLM2-135M at 70% wants ~0.4 in the first blocks and ~0.9 in the last (a ± 0.2 box cut that optimum off).
BOUND_WIDTH = 0.35


# Measurement effort when the user gives none. A real model on CPU gets short sequences and few of them: on
# SmolLM2-135M with 2 cores a forward of 8 x 256 tokens takes seconds, and benchmarks/search_cost.py shows how few
# fitness sequences still rank candidates as the full set does. The built-in model and GPUs keep the full protocol.
EFFORT = {
    "builtin": {"nsamples": 128, "fitness_samples": 32, "low_fidelity_samples": 8},
    "gpu": {"nsamples": 128, "fitness_samples": 32, "low_fidelity_samples": 8},
    "cpu": {"seqlen": 256, "nsamples": 32, "fitness_samples": 16, "low_fidelity_samples": 4},
}


# Report windows per dataset unless --report-limit says. The report prunes the best allocation and every seed for
# real (8 on one budget) and measures each on every dataset: at 256 windows of 256 tokens SmolLM2's report had not
# finished after 35 minutes on 2 cores, so a real model on CPU reports on 64 (16k tokens per dataset; 12 minutes).
REPORT_WINDOWS = {"builtin": 256, "gpu": 256, "cpu": 64}


def _effort_kind(builtin: bool, device: str) -> str:
    return "builtin" if builtin else "gpu" if device.startswith("cuda") else "cpu"


def default_effort(builtin: bool, device: str) -> dict:
    """The calibration and fitness sizes a search uses unless told otherwise (see ``EFFORT``)."""
    return dict(EFFORT[_effort_kind(builtin, device)])


def default_report_limit(builtin: bool, device: str) -> int:
    """Report windows per dataset unless told otherwise (see ``REPORT_WINDOWS``)."""
    return REPORT_WINDOWS[_effort_kind(builtin, device)]


def default_stats_inputs(builtin: bool, pruner: str, space: str) -> str | None:
    """``candidate`` for a Wanda or GBLM sparsity search of a model other than the built-in one, else None (the
    realizer's default). On SmolLM2-135M at 70% the dense-input proxy cannot tell good drop sets from bad ones: its
    answers read 0.76-1.0x ATP 0.3's perplexity where pruning every candidate for real reads 0.70-0.74x on three
    seeds, at 1.8x the wall time (28-30 min per 100 trials on 2 cores; drop_sets-smollm2-wanda-70.md)."""
    real = not builtin and space == "sparsity" and pruner in PRUNERS
    return "candidate" if real and prunes_candidates(pruner) else None


def prunes_candidates(pruner: str) -> bool:
    """Whether ``--stats-inputs candidate`` applies: a pruner realized from ranks that reads its inputs (Wanda,
    GBLM; magnitude reads none, and SparseGPT's solver per candidate would cost minutes)."""
    method = get_method(pruner)
    return method.realizer == "ranks" and method.needs != "none"


@dataclass
class SearchSettings:
    """Everything that defines a study; two runs with equal settings are the same study."""

    model: str | None = None
    budget: str = "sparsity=0.7"
    pattern: str = "unstructured"
    granularity: str = "block"
    pruner: str = "wanda"
    fitness: str = "kl"
    sampler: str = "tpe"
    min_sparsity: float | None = None
    max_sparsity: float | None = None
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    fitness_samples: int = 32
    low_fidelity_samples: int = 8
    prune_percentile: float = 50.0
    data_dir: str | None = None
    level_step: float = 0.025
    space: str = "sparsity"
    width_score: str = "flap"
    latency_table: str | None = None  # a latency= budget's table (pruners.width.latency JSON); None: measure here
    stats_inputs: str | None = None  # None: the realizer's default (DEFAULT_STATS_INPUTS)
    candidate_nsamples: int | None = None  # --stats-inputs candidate: calibration sequences per candidate
    fitness_data: str = "c4"  # the fitness's held-out text: C4 documents, a WikiText-2 / PTB validation split, or a
    # mix of them (c4+wikitext2: windows alternate)
    enqueue: list[str] = field(default_factory=list)  # sparsity configs measured first, beside the heuristic seeds
    drop_scan: str = "auto"  # search.drops: on, off, or auto (single-budget sparsity searches without --enqueue)
    drop_run: int | None = None  # blocks per drop-scan unit; None: search.drops.run_length (a tenth of the depth)

    def __post_init__(self):
        self.enqueue = [str(Path(c).resolve()) for c in self.enqueue]  # a resumed run finds them from any folder
        if self.stats_inputs is None and self.pruner in PRUNERS:
            self.stats_inputs = DEFAULT_STATS_INPUTS[self.realizer] if self.space == "sparsity" else "dense"
        if self.stats_inputs == "candidate" and self.candidate_nsamples is None:
            self.candidate_nsamples = min(CANDIDATE_NSAMPLES, self.nsamples)

    @property
    def multi_objective(self) -> bool:
        """A budget range: fitness and the ranged budget are both objectives (NSGA-II by default)."""
        from search.budget import Budget

        return Budget.parse(self.budget).ranged is not None

    @property
    def realizer(self) -> str:
        """How the search realizes the pruner's candidates: ``ranks`` (cached weight ranks) or ``levels`` (a
        database of weights per sparsity level, which the pruner builds because it updates the kept weights)."""
        return get_method(self.pruner).realizer

    def validate(self) -> None:
        """Refuse settings that are wrong whatever the model, before anything is loaded or written."""
        if self.pruner not in PRUNERS:
            why = (f" ({self.pruner} cannot be searched; search with one of these and realize the result with "
                   f"--method {self.pruner})" if self.pruner in METHODS else "")
            raise UserError(f"search pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}{why}")
        if self.stats_inputs not in STATS_INPUTS:
            raise UserError(f"--stats-inputs must be one of {', '.join(STATS_INPUTS)}, got {self.stats_inputs!r}")
        if self.stats_inputs == "candidate":
            self._validate_candidate()
        elif self.candidate_nsamples is not None:
            raise UserError("--candidate-nsamples applies to --stats-inputs candidate only")
        from prunesearch.sources import NAMES, mix_parts

        if "+" not in self.fitness_data and self.fitness_data not in NAMES:
            raise UserError(f"--fitness-data must be one of {', '.join(NAMES)} or a mix of them joined with '+' "
                            f"(c4+wikitext2), got {self.fitness_data!r}")
        mix_parts(self.fitness_data)
        if self.drop_scan not in DROP_SCAN:
            raise UserError(f"--drop-scan must be one of {', '.join(DROP_SCAN)}, got {self.drop_scan!r}")
        if self.drop_run is not None and self.drop_run < 1:
            raise UserError(f"--drop-run must be a whole number of blocks >= 1, got {self.drop_run}")
        if not 0 < self.level_step < 1:
            raise UserError(f"level step must be in (0, 1), got {self.level_step}")
        from search.fitness import KINDS

        if self.fitness not in KINDS:
            raise UserError(f"fitness must be one of {', '.join(KINDS)}, got {self.fitness!r}")
        if not 0 < self.low_fidelity_samples <= self.fitness_samples:
            raise UserError("need 0 < low-fidelity samples <= fitness samples")
        if self.drop_scan == "on" and (self.multi_objective or self.space != "sparsity"):
            raise UserError("--drop-scan on scans one budget of the sparsity space; a budget range and --space "
                            "width or both take --drop-scan off or auto")
        if self.multi_objective and self.sampler == "evo":
            raise UserError("the evolutionary sampler keeps one budget; a budget range needs nsga2, tpe or qmc")
        if self.multi_objective and self.realizer == "levels":
            raise UserError(f"the {self.pruner} level database is built for one budget; a budget range needs one of "
                            f"{', '.join(names(realizer='ranks'))}")
        from pruners.masks import parse_pattern
        from search.budget import WIDTH_KINDS, Budget

        parse_pattern(self.pattern)
        budget = Budget.parse(self.budget)
        if self.space == "sparsity" and (len(budget.limits) > 1 or budget.kinds[0] not in ("sparsity", "params")):
            raise UserError(f"budget {self.budget!r}: the sparsity space takes one sparsity= or params= budget; "
                            f"{', '.join(k + '=' for k in WIDTH_KINDS[1:])} and several limits at once count "
                            "removed heads and channels: use --space width")
        if self.space not in SPACES:
            raise UserError(f"search space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.space == "both" and ("params" not in budget.kinds or (budget.ranged is not None
                                                                     and budget.ranged.kind != "params")):
            raise UserError(f"--space both searches a params= budget of nonzero parameters (such as params=60%, or a "
                            f"range params=40%:70% for a Pareto front; flops=, memory= and latency= may limit the "
                            f"widths too), got {self.budget!r}")
        if self.enqueue and self.space != "sparsity":
            raise UserError(f"--enqueue starts a sparsity search from a per-layer sparsity config; --space "
                            f"{self.space} does not take one")
        if self.space in ("width", "both"):
            self._validate_width()
        from pruners.targets import SparsityConfig

        for path in self.enqueue:
            SparsityConfig.load(path)  # a missing or malformed file is one line, before anything loads

    def _validate_candidate(self) -> None:
        """``--stats-inputs candidate`` needs a pruner that takes it and no more calibration than the run has."""
        if not prunes_candidates(self.pruner):
            usable = ", ".join(p for p in PRUNERS if prunes_candidates(p))
            raise UserError(f"--stats-inputs candidate prunes each candidate sequentially from its own inputs; it "
                            f"needs a pruner that reads inputs and is realized from ranks ({usable}), got "
                            f"--pruner {self.pruner}")
        if not 0 < self.candidate_nsamples <= self.nsamples:
            raise UserError(f"--candidate-nsamples must be in 1..--nsamples ({self.nsamples}), got "
                            f"{self.candidate_nsamples}")

    def _validate_width(self) -> None:
        """What the width spaces cannot take: a sparsity= budget, N:M, another pruner (the both space prunes the
        kept weights with Wanda, whose per-row ranks it caches), bounds, or the evolutionary sampler."""
        from pruners.width.importance import METRICS

        from search.budget import Budget

        if "sparsity" in Budget.parse(self.budget).kinds:
            raise UserError(f"--space width needs params=, flops=, memory= or latency= budgets (such as params=75% "
                            f"or params=100M,latency=70%), got {self.budget!r}")
        if self.pattern != "unstructured":
            raise UserError(f"--space {self.space} removes whole heads and channels; --pattern {self.pattern} does not "
                            "apply")
        if self.pruner != "wanda":
            raise UserError(f"--space {self.space} scores heads and channels with --width-score; --pruner "
                            f"{self.pruner} does not apply")
        if (self.granularity != "block" or self.min_sparsity is not None or self.max_sparsity is not None
                or self.stats_inputs != "dense"):
            raise UserError("--granularity, --min-sparsity, --max-sparsity and --stats-inputs apply to the sparsity "
                            "space only")
        if self.sampler == "evo":
            raise UserError(f"the evolutionary sampler moves sparsity levels; --space {self.space} needs tpe, qmc or "
                            "nsga2")
        if self.width_score not in METRICS:
            raise UserError(f"--width-score must be one of {', '.join(METRICS)}, got {self.width_score!r}")

    def signature(self) -> dict:
        return dataclasses.asdict(self)

    def key(self, *fields: str) -> str:
        """A short hash of some settings, naming the cache files that depend on exactly those."""
        sig = self.signature()
        return hashlib.sha256(json.dumps({f: sig[f] for f in fields}, sort_keys=True).encode()).hexdigest()[:12]
