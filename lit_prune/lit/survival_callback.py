"""RQ2 (geometric + functional feature survival) and RQ4 (firing-rate fragility) as a callback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from lit_prune.analysis.figures import survival_figures
from lit_prune.analysis.matching import MATCH_METHODS
from lit_prune.analysis.results import make_rows, write_arrays
from lit_prune.analysis.survival_measures import SurvivalResult, survival_measurements
from lit_prune.analysis.transfer import PairedPass, paired_features
from lit_prune.errors import invalid
from lit_prune.lit.analysis_callbacks import ReferenceSAECallback, dense_lm
from lit_prune.lit.datamodule import datamodule_of
from lit_prune.models.activation_cache import weights_digest
from lit_prune.sae.build import build_training_sae

if TYPE_CHECKING:  # annotations only (sae_module imports these callbacks' modules)
    from lit_prune.lit.sae_module import SAEModule

_RQ4 = (
    "rho",
    "survival_bin",
    "functional_rho",
    "functional_survival_bin",
)  # the metrics tagged rq4/ in TensorBoard


class FeatureSurvivalCallback(ReferenceSAECallback):
    """Every validation epoch: do the reference (dense-model) SAE's features survive in this run?

    Geometric survival matches the reference decoder to the module's SAE decoder; functional
    survival runs the reference on the dense and on the current LM over the same eval tokens.
    Cross-seed is the primary measure: rows carry `same_seed` (module seed == the reference's
    recorded seed; False for foreign SAEs) and each module feature's cosine to its own init is
    kept (the init decoder is captured at fit start, or rebuilt from the module's seed).
    Writes <dir>/results/rq2_survival.json (rows with extra keys tau, epoch, stage, same_seed) and
    rq2_survival.safetensors (the latest measurement's per-feature arrays), logs rq2/... and rq4/...
    scalars and, with a TensorBoard logger, three figures.

    Args:
        reference_sae: directory of the dense-model SAE (ours, or a foreign sae-lens SAE).
        taus: matched-cosine thresholds of geometric survival.
        functional_sequences: eval sequences for functional survival and firing rates; null: all
            (dead/alive counts need >= 80k tokens).
        functional_threshold: a feature survives functionally iff Pearson r >= this.
        seed_baseline: S_seed, the same-pair cross-seed survival (RQ1) at seed_baseline_tau; when
            given, S~ = S / S_seed is reported as S_normalised.
        seed_baseline_tau: the tau at which seed_baseline was measured.
        n_bins: firing-rate quantile bins (RQ4).
        n_boot: bootstrap resamples for the RQ4 confidence intervals.
        matching: one-to-one matching solver: auto (equal widths above 1,024 latents: exact, the
            Hungarian optimum without the dense matrix; otherwise dense Hungarian up to 16,384 latents
            and the sparse candidate solver above), hungarian, exact or sparse.
        candidates: candidate partners per feature of the sparse / exact solvers.
        log_figures: log the matched-cosine, survival-by-bin and firing-rate figures.
        output_dir: where results/ is written; null: the trainer's log dir.
        batch_size: eval sequences per forward; null: the datamodule's batch size.
        at_fit_end: measure once more at the end of fit (validation already sees the final SAE;
            useful when validation runs mid-epoch).
    """

    results_name = "rq2_survival.json"
    arrays_name = "rq2_survival.safetensors"

    def __init__(
        self,
        reference_sae: str,
        taus: tuple[float, ...] = (0.5, 0.7, 0.9),
        functional_sequences: int | None = None,
        functional_threshold: float = 0.7,
        seed_baseline: float | None = None,
        seed_baseline_tau: float = 0.7,
        n_bins: int = 5,
        n_boot: int = 1000,
        log_figures: bool = True,
        output_dir: str | None = None,
        batch_size: int | None = None,
        at_fit_end: bool = False,
        matching: str = "auto",
        candidates: int = 8,
    ) -> None:
        super().__init__(reference_sae, output_dir, batch_size, at_fit_end)
        if matching not in MATCH_METHODS:
            raise invalid("matching", matching, " | ".join(MATCH_METHODS))
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise invalid("candidates", candidates, "a positive integer")
        if not taus or any(not -1 <= t <= 1 for t in taus):
            raise invalid("taus", taus, "a non-empty list of cosines in [-1, 1]")
        if not -1 <= functional_threshold <= 1:
            raise invalid("functional_threshold", functional_threshold, "a Pearson r in [-1, 1]")
        if seed_baseline is not None and not 0 < seed_baseline <= 1:
            raise invalid("seed_baseline", seed_baseline, "a shared fraction in (0, 1] or null")
        if functional_sequences is not None and functional_sequences < 1:
            raise invalid("functional_sequences", functional_sequences, "a positive integer or null")
        if n_bins < 1 or n_boot < 1:
            raise invalid("n_bins, n_boot", (n_bins, n_boot), "positive integers")
        self.taus = tuple(float(t) for t in taus)
        self.functional_sequences, self.functional_threshold = functional_sequences, functional_threshold
        self.seed_baseline, self.seed_baseline_tau = seed_baseline, seed_baseline_tau
        self.n_bins, self.n_boot, self.log_figures = n_bins, n_boot, log_figures
        self.matching, self.candidates = matching, candidates
        self.init_decoder: torch.Tensor | None = None
        self._cache: tuple[str, PairedPass] | None = None
        self.last: SurvivalResult | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        if self.init_decoder is None and int(pl_module.tokens_trained) == 0:
            self.init_decoder = pl_module.sae.W_dec.detach().cpu().clone()

    def _init(self, module: SAEModule) -> torch.Tensor:
        """The module SAE's decoder at init; rebuilt from its seed when the fit resumed mid-training."""
        if self.init_decoder is None:
            fresh = build_training_sae(
                module.settings, module.lm.config.hidden_size, int(module.hparams.seed)
            )
            self.init_decoder = fresh.W_dec.detach().clone()
        return self.init_decoder

    def same_seed(self, module: SAEModule) -> bool:
        return self.reference_seed is not None and self.reference_seed == int(module.hparams.seed)

    def _paired(self, trainer: L.Trainer, module: SAEModule) -> PairedPass:
        """Reference on dense vs current LM; cached while the current LM's weights stay the same."""
        lm = module.lm_on_device()
        fingerprint = weights_digest(lm)
        if self._cache is None or self._cache[0] != fingerprint:
            assert self.reference is not None  # loaded in setup
            ids = datamodule_of(trainer).eval_ids[: self.functional_sequences]
            self._cache = (
                fingerprint,
                paired_features(
                    dense_lm(module),
                    lm,
                    module.hparams.hook_layer,
                    self.reference.encode,
                    ids,
                    self.eval_batch_size(trainer),
                ),
            )
        return self._cache[1]

    def measure(self, trainer: L.Trainer, module: SAEModule, stage: str) -> None:
        paired = self._paired(trainer, module)
        assert self.reference is not None  # loaded in setup
        result = survival_measurements(
            self.reference.W_dec.detach().cpu(),
            module.sae.W_dec.detach().cpu(),
            self._init(module),
            paired,
            self.taus,
            self.functional_threshold,
            self.n_bins,
            self.n_boot,
            self.seed_baseline,
            self.seed_baseline_tau,
            matching=self.matching,
            candidates=self.candidates,
        )
        self.last = result
        epoch = trainer.current_epoch if stage == "validation" else None
        cond, same = self.condition(module), self.same_seed(module)
        rows = [
            row
            for tau, metrics in result.metrics.items()
            for row in make_rows(cond, metrics, tau=tau, epoch=epoch, same_seed=same, stage=stage)
        ]
        self.write(trainer, rows)
        write_arrays(
            self.results_dir(trainer) / self.arrays_name,
            global_step=torch.tensor(trainer.global_step),
            **result.arrays,
        )
        scalars = {}
        for tau, metrics in result.metrics.items():
            for name, value in metrics.items():
                rq = "rq4" if name.startswith(_RQ4) else "rq2"
                scalars[f"{rq}/{name}" + ("" if tau is None else f"@{tau:g}")] = value
        self.log_scalars(trainer, scalars)
        experiment: Any = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_histogram"):  # the distribution behind the matched-cosine scalars
            experiment.add_histogram(
                "rq2/matched_cosine", result.arrays["matched_cosine"], global_step=trainer.global_step
            )
        if self.log_figures and hasattr(experiment, "add_figure"):
            when = f"epoch {epoch}" if stage == "validation" else "end of fit"
            title = f"{cond.method} s={cond.sparsity:g}, {when}, {'same' if same else 'cross'}-seed"
            for tag, fig in survival_figures(
                result, self.taus, self.functional_threshold, self.n_bins, title
            ).items():
                experiment.add_figure(tag, fig, global_step=trainer.global_step, close=True)
