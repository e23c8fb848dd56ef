"""What a study runs: the grid (methods x sparsities x seeds) and the sizes of its runs.

The `study:` section of a model config (configs/*.yaml); the config's `model:` and `data:`
sections describe the LM, hook, SAE and corpus exactly as for `fit`, and `study.model` /
`study.data` override them for the study's runs (a study trains many SAEs, so each usually
gets a smaller budget than a single `fit`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lit_prune.analysis.survival import TAUS as REPORT_TAUS
from lit_prune.errors import LitPruneError, invalid
from lit_prune.pruning import GROUPS

METHODS = ("magnitude", "wanda", "sparsegpt")
ABLATION_MINIMUM = {
    "n_top": 0,
    "n_random": 0,
    "n_rare": 0,
    "eval_sequences": 1,
    "batch_size": 1,
    "max_sequences": 1,
}
"""study.ablation's options and the least value of each."""

DENSE = "dense"


def rq5_name(seed: int, reference_seed: int) -> str:
    """The RQ5 step of dense seed `seed`'s SAE: rq5 for the reference, rq5_seed<s> for the others."""
    return "rq5" if seed == reference_seed else f"rq5_seed{seed}"


# The Trainer settings the fit steps take from the study's trainer section (the other steps only
# read the accelerator). One device (the default, devices: 1 or absent): the fit runs in the study's
# own process with devices=1. More (devices > 1 or a list of several, "auto" / -1 finding several
# accelerators, num_nodes > 1): it runs as a child process, `python -m lit_prune.study.fit_child`,
# an ordinary Lightning DDP run over them (strategy "ddp" unless given). Not in the study's process:
# Lightning's DDP launcher re-runs the command line for the other ranks, which for a study would
# re-enter the runner and wait forever on the step's lock. Each rank reads data.batch_size sequences
# per LM batch (Lightning's DistributedSampler), so the global batch is devices x num_nodes x
# batch_size. Shards (--shard i/n) still split the conditions between study processes.
TRAINER_KEYS = ("accelerator", "precision", "deterministic")
DDP_KEYS = ("devices", "num_nodes", "strategy")


@dataclass
class WarmStartSettings:
    """RQ2c, survival under retraining (docs/methods.md §4): each dense seed's SAE is trained further
    on every pruned model and, as the control, on the dense model, for the same steps and data order
    (the study's training tokens, its seed's order); the lr schedule's warm-up and decay are the
    study's. Costs one short fit per (condition + 1) x seed."""

    enabled: bool = True
    """Run the warm-start steps (dense/warm<s> and <condition>/warm<s>)."""
    steps: int = 500
    """T: SAE optimizer steps of each warm start (passes over the training tokens as needed)."""
    lr: float = 1e-3
    """Peak Adam learning rate of the warm starts (a fresh optimizer)."""
    sae_batch_tokens: int = 256
    """Activations per warm-start step."""
    seeds: list[int] | None = None
    """Dense seeds whose SAE is warm-started (each a subset of study.seeds); null: every seed, so that
    the ratio's CI includes seed variance. [<first seed>] costs 1 / len(seeds) as much."""
    n_boot: int = 1000
    """Bootstrap resamples of the ratio's CI (over seeds, then features)."""

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "sae_batch_tokens": self.sae_batch_tokens, "n_boot": self.n_boot}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise invalid(f"study.warm_start.{name}", value, "an integer >= 1")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise invalid("study.warm_start.lr", self.lr, "a positive number")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise invalid("study.warm_start.seeds", self.seeds, "null or a non-empty list of distinct seeds")


RECOVERY_MODES = ("full", "lora")
RECOVERED = "recovered"
"""Suffix of a recovered condition's name and label: wanda-0.5-recovered, wanda-recovered."""


@dataclass
class RecoverySettings:
    """RQ6, does recovery restore features? (docs/methods.md §4 RQ6): each chosen pruned model is
    fine-tuned with its masks kept exact (`PrunedLMModule`, on the study's training split) and the
    recovered model is measured like the pruned ones: perplexity, RQ2 survival against the dense
    reference (every cross-seed pair and functional), RQ3 transfer of the dense SAE. Costs one
    fine-tune plus the pruned fits of one more condition per entry of conditions."""

    conditions: list[str] = field(default_factory=list)
    """Pruned conditions to recover, by name (e.g. [wanda-0.5]; each must be in the study's grid);
    each adds a condition <name>-recovered."""
    tokens: int = 204_800
    """Training tokens of each recovery fine-tune (the first of the study's train split; rounded down to
    whole sequences of data.seq_len)."""
    lr: float = 2e-5
    """Peak AdamW learning rate (full: the Linears' weights; lora: the adapters)."""
    batch_size: int = 8
    """Sequences per optimizer step."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up in optimizer steps, constant afterwards."""
    weight_decay: float = 0.0
    """AdamW weight decay (pruned weights stay exactly 0 either way)."""
    mode: str = "full"
    """full: fine-tune the decoder blocks' Linears; lora: rank-lora_rank adapters on them, merged and
    re-masked into the weights (`lit_prune.pruning.lora`)."""
    lora_rank: int = 8
    """Rank of each LoRA adapter (mode lora)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator, update = (lora_alpha / lora_rank) B A (mode lora)."""

    def __post_init__(self) -> None:
        if (
            not isinstance(self.conditions, list)
            or not self.conditions
            or len(set(self.conditions)) != len(self.conditions)
        ):
            raise invalid(
                "study.recovery.conditions", self.conditions, "a non-empty list of distinct condition names"
            )
        at_least = {"tokens": 1, "batch_size": 1, "warmup_steps": 0, "lora_rank": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise invalid(f"study.recovery.{name}", value, f"an integer >= {low}")
        for name, positive in (("lr", True), ("lora_alpha", True), ("weight_decay", False)):
            value = getattr(self, name)
            if not (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and (value > 0 if positive else value >= 0)
            ):
                raise invalid(
                    f"study.recovery.{name}",
                    value,
                    "a finite number > 0" if positive else "a finite number >= 0",
                )
        if self.mode not in RECOVERY_MODES:
            raise invalid("study.recovery.mode", self.mode, " or ".join(RECOVERY_MODES))

    def fine_tune(self) -> dict[str, Any]:
        """The settings of each fine-tune (everything but the conditions): a recover step's inputs."""
        return {k: v for k, v in asdict(self).items() if k != "conditions"}


@dataclass
class StudySettings:
    """The paper's grid: model x hook x SAE settings x methods x sparsities x seeds."""

    name: str | None = None
    """Study name: artefacts go to <checkpoints>/<name>/, TensorBoard runs to <logs>/<name>/.
    null: the config file's name (smollm2 for configs/smollm2.yaml)."""
    methods: list[str] = field(default_factory=lambda: ["magnitude", "wanda"])
    """Pruning methods: any of magnitude, wanda and sparsegpt (SparseGPT with dampening 0.01 and
    column blocks of 128)."""
    sparsities: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.6])
    """Unstructured sparsities in (0, 1), each run with every method (the dense model is always run)."""
    nm: list[list[int]] = field(default_factory=list)
    """Extra semi-structured conditions [N, M] (e.g. [[2, 4]]), each run with every method."""
    magnitude_group: str = "matrix"
    """What magnitude pruning ranks |W| within for the unstructured conditions: matrix (each matrix
    to the exact sparsity), row (each output row) or global (all decoder-block matrices together)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """SAE seeds trained on the dense model; the first is the reference seed (RQ1 needs two or more)."""
    pruned_seeds: list[int] | None = None
    """SAE seeds trained on every pruned model: a subset of seeds that holds the reference seed (its
    fit also measures RQ3 and functional survival); null: every seed. RQ2 counts every cross-seed
    pair (dense seed a, pruned seed b, a != b), so [<reference seed>] with three seeds still gives
    two cross-seed pairs per condition, at a third of the pruned fits' cost."""
    epochs: int = 1
    """Passes of each SAE over its training tokens; later passes reuse the shared activations (no LM
    forwards), so on a CPU they buy SAE quality cheaply. Validation and the RQ callbacks run after the last."""
    reference_sae: str | None = None
    """A pretrained dense-model SAE (sae-lens directory, e.g. Gemma Scope) to use as the reference for
    RQ2 / RQ3 / RQ5 instead of our own first-seed dense SAE."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of the config's model section for the study's runs (nested: {sae: {expansion: 4}})."""
    data: dict[str, Any] = field(default_factory=dict)
    """Overrides of the config's data section for the study's runs."""
    survival: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of FeatureSurvivalCallback (e.g. functional_sequences, n_boot, matching). RQ1
    uses the same taus, matching and candidates, and seed_baseline_tau as its stability threshold.
    taus must include the report's 0.5, 0.7 and 0.9 (docs/methods.md §3; others may be added)."""
    transfer: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of TransferabilityCallback (e.g. sae_prune_levels, ce_sequences)."""
    ablation: dict[str, Any] = field(default_factory=dict)
    """Arguments of the RQ5 ablation on the dense model: n_top, n_random, n_rare (default 64 each),
    eval_sequences (default: >= 4,096 tokens), batch_size (ablated copies per forward, default 8) and
    max_sequences (each feature ablated in at most this many of the sequences where it fires;
    default: all)."""
    importance_seeds: list[int] | None = None
    """Dense seeds whose SAEs RQ5 ablates (study.ablation's features of each): distinct seeds among
    seeds that hold the reference seed; null: every seed. Several put the choice of the reference SAE
    into RQ5's confidence intervals. With reference_sae only that SAE is ablated."""
    perplexity_sequences: int = 32
    """Eval sequences on which the dense and each pruned model's perplexity is measured."""
    gallery_condition: str | None = None
    """Condition whose before / after contexts the feature gallery shows (e.g. wanda-0.4); null: the
    Wanda (else magnitude) condition with the largest sparsity <= 0.5."""
    gallery_features: int = 4
    """Surviving and lost features shown in the gallery (each)."""
    gallery_sequences: int = 128
    """Eval sequences searched for the gallery's top-activating contexts."""
    cache_gb: float = 4.0
    """Memory for activations shared between the runs of one process (0 disables sharing); it is held
    where they are computed, so on a GPU this is GPU memory. A multi-device fit runs in child
    processes (one per rank) that each have their own cache of this size."""
    workers: int = 1
    """Processes that share the study's steps on this machine, each with an equal share of the CPU
    threads. An SAE training step gives the same bits on 1 and 2 threads (tested); long metric sums
    add in another order, so metrics may move in their last bits. On a small CPU two single-threaded
    workers finish sooner than one two-threaded process (the LM's GEMMs scale sublinearly with threads, the SAE steps'
    Python and small kernels not at all). Each worker has its own cache_gb. Must be 1 when a fit uses
    several devices. On several GPUs each worker takes one of them in turn (unless trainer.devices names
    one); on a single GPU the workers would share it, so keep it 1 there."""
    warm_start: WarmStartSettings = field(default_factory=WarmStartSettings)
    """RQ2c: the dense SAEs trained further on each pruned model, against a dense control."""
    recovery: RecoverySettings | None = None
    """RQ6: recover these pruned models by masked fine-tuning and measure them again (e.g.
    {conditions: [wanda-0.5], tokens: 204800, lr: 2.0e-5}); null: off."""
    checkpoints: str = "checkpoints"
    """Root of the study's artefacts."""
    logs: str = "logs"
    """Root of the study's TensorBoard runs."""

    def __post_init__(self) -> None:
        if (
            not self.methods
            or len(set(self.methods)) != len(self.methods)
            or set(self.methods) - set(METHODS)
        ):
            raise invalid(
                "study.methods", self.methods, "a non-empty list without duplicates of " + ", ".join(METHODS)
            )
        if len(set(self.sparsities)) != len(self.sparsities):
            raise invalid("study.sparsities", self.sparsities, "a list without duplicates")
        for s in self.sparsities:
            if not (isinstance(s, (int, float)) and math.isfinite(s) and 0 <= s < 1):
                raise invalid("study.sparsities", self.sparsities, "values in [0, 1)")
        for pattern in self.nm:
            if len(pattern) != 2 or not 0 < pattern[0] < pattern[1]:
                raise invalid("study.nm", self.nm, "a list of [N, M] pairs with 0 < N < M")
        if len({tuple(p) for p in self.nm}) != len(self.nm):
            raise invalid("study.nm", self.nm, "a list without duplicates")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise invalid("study.seeds", self.seeds, "a non-empty list of distinct integers >= 0")
        names = [c.name for c in self._grid()]
        if len(set(names)) != len(names):
            raise invalid(
                "study.sparsities",
                self.sparsities,
                "values that differ in their first 6 significant "
                "digits (each names a directory, e.g. magnitude-0.123456)",
            )
        if self.perplexity_sequences < 1 or self.gallery_features < 0 or self.gallery_sequences < 1:
            raise invalid(
                "study.perplexity_sequences / gallery_features / gallery_sequences",
                (self.perplexity_sequences, self.gallery_features, self.gallery_sequences),
                "a positive integer / a non-negative integer / a positive integer",
            )
        if self.magnitude_group not in GROUPS:
            raise invalid("study.magnitude_group", self.magnitude_group, "one of " + ", ".join(GROUPS))
        taus = self.survival.get("taus", REPORT_TAUS)
        if not isinstance(taus, (list, tuple)) or not set(REPORT_TAUS) <= {
            float(t) for t in taus if isinstance(t, (int, float))
        }:
            raise invalid(
                "study.survival.taus", taus, "a list that includes 0.5, 0.7 and 0.9 (the report's thresholds)"
            )
        for key, value in self.ablation.items():
            if key not in ABLATION_MINIMUM:
                raise invalid(f"study.ablation.{key}", value, "a key among " + ", ".join(ABLATION_MINIMUM))
            if isinstance(value, bool) or not isinstance(value, int) or value < ABLATION_MINIMUM[key]:
                raise invalid(f"study.ablation.{key}", value, f"an integer >= {ABLATION_MINIMUM[key]}")
        if isinstance(self.warm_start, dict):  # from a parsed config or study.json
            self.warm_start = WarmStartSettings(**self.warm_start)
        if isinstance(self.recovery, dict):  # from a parsed config or study.json
            self.recovery = RecoverySettings(**self.recovery)
        if self.recovery is not None:
            grid = [c.name for c in self._grid()]
            unknown = [c for c in self.recovery.conditions if c not in grid]
            if unknown:
                raise invalid(
                    "study.recovery.conditions",
                    self.recovery.conditions,
                    "names of the grid's conditions: " + ", ".join(grid),
                )
        if not set(self.warm_seeds()) <= set(self.seeds):
            raise invalid(
                "study.warm_start.seeds", self.warm_start.seeds, f"seeds among study.seeds {self.seeds}"
            )
        self._check_seed_subset("pruned_seeds", self.pruned_seeds)
        self._check_seed_subset("importance_seeds", self.importance_seeds)
        if self.epochs < 1:
            raise invalid("study.epochs", self.epochs, "an integer >= 1")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise invalid("study.workers", self.workers, "an integer >= 1")
        if not (math.isfinite(self.cache_gb) and self.cache_gb >= 0):
            raise invalid("study.cache_gb", self.cache_gb, "a finite non-negative number")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise invalid(
                "study.name", self.name, "a non-empty name without '/' that does not start with '.'"
            )

    def _check_seed_subset(self, name: str, chosen: list[int] | None) -> None:
        if chosen is not None and (
            len(set(chosen)) != len(chosen)
            or not set(chosen) <= set(self.seeds)
            or self.reference_seed not in chosen
        ):
            raise invalid(
                f"study.{name}",
                chosen,
                f"null or distinct seeds among study.seeds {self.seeds} that include the reference seed "
                f"{self.reference_seed}",
            )

    @property
    def reference_seed(self) -> int:
        return self.seeds[0]

    def _grid(self) -> list[PruneCondition]:
        out = [PruneCondition(m, float(s)) for m in self.methods for s in sorted(self.sparsities) if s > 0]
        return out + [PruneCondition(m, p[0] / p[1], (p[0], p[1])) for m in self.methods for p in self.nm]

    def method_of(self, condition_name: str) -> tuple[str, float]:
        """(method label, sparsity) of a condition's results rows: (dense, 0.0) for the dense model."""
        if condition_name == DENSE:
            return DENSE, 0.0
        cond = next(c for c in self.conditions() + self.recovered_conditions() if c.name == condition_name)
        return cond.label, cond.sparsity

    def recovered_conditions(self) -> list[PruneCondition]:
        """RQ6: the recovered twin of each condition in study.recovery.conditions, in grid order ([] when off)."""
        if self.recovery is None:
            return []
        chosen = set(self.recovery.conditions)
        return [replace(c, recovered=True) for c in self._grid() if c.name in chosen]

    def seeds_of_pruned(self) -> list[int]:
        """The SAE seeds trained on each pruned model (study.pruned_seeds, else every seed)."""
        return list(self.seeds if self.pruned_seeds is None else self.pruned_seeds)

    def seeds_of_importance(self) -> list[int]:
        """The dense seeds whose SAEs RQ5 ablates, the reference first (only it with reference_sae)."""
        if self.reference_sae is not None:
            return [self.reference_seed]
        chosen = self.seeds if self.importance_seeds is None else self.importance_seeds
        return [self.reference_seed] + [s for s in chosen if s != self.reference_seed]

    def warm_seeds(self) -> list[int]:
        """The dense seeds whose SAE RQ2c warm-starts ([] when it is off)."""
        if not self.warm_start.enabled:
            return []
        return list(self.seeds if self.warm_start.seeds is None else self.warm_start.seeds)

    def rq1_options(self) -> dict[str, Any]:
        """seed_stability's options that the survival settings set (RQ1 and RQ2 must agree)."""
        args = {
            "taus": "taus",
            "seed_baseline_tau": "stability_tau",
            "matching": "method",
            "candidates": "candidates",
        }
        return {arg: self.survival[key] for key, arg in args.items() if key in self.survival}

    def magnitude_group_of(self, cond: PruneCondition) -> str | None:
        """The group prune_model gets for a condition: only unstructured magnitude has one."""
        return self.magnitude_group if cond.method == "magnitude" and cond.nm is None else None

    def conditions(self) -> list[PruneCondition]:
        """Every pruned condition of the grid (the dense model is implicit), in a fixed order."""
        out = self._grid()
        if not out:
            raise LitPruneError("study grid has no pruned conditions: give study.sparsities > 0 or study.nm")
        return out


@dataclass(frozen=True)
class PruneCondition:
    """One pruned model of the grid."""

    method: str
    sparsity: float
    nm: tuple[int, int] | None = None
    recovered: bool = False
    """RQ6: this pruned model after its recovery fine-tune (the same masks)."""

    @property
    def name(self) -> str:
        """Directory name: wanda-0.5, magnitude-2of4, wanda-0.5-recovered."""
        base = f"{self.method}-{self.nm[0]}of{self.nm[1]}" if self.nm else f"{self.method}-{self.sparsity:g}"
        return f"{base}-{RECOVERED}" if self.recovered else base

    @property
    def label(self) -> str:
        """Row label of the method, as the analysis callbacks write it (wanda, wanda-2:4, wanda-recovered)."""
        base = f"{self.method}-{self.nm[0]}:{self.nm[1]}" if self.nm else self.method
        return f"{base}-{RECOVERED}" if self.recovered else base

    @property
    def source(self) -> PruneCondition:
        """The pruned condition itself (a recovered one's unrecovered twin, whose masks it keeps)."""
        return replace(self, recovered=False)
