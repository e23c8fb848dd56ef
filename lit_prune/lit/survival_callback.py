"""RQ2 (geometric + functional feature survival) and RQ4 (firing-rate fragility) as a callback."""

from __future__ import annotations

import math
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from matplotlib.figure import Figure

from lit_prune.analysis.fragility import firing_rate_analysis, firing_rate_bins
from lit_prune.analysis.matching import MATCH_METHODS, unit_rows
from lit_prune.analysis.results import make_rows, write_arrays
from lit_prune.analysis.survival import geometric_survival, normalised_survival, survival_from_accumulator
from lit_prune.analysis.transfer import PairedPass, paired_features
from lit_prune.errors import invalid
from lit_prune.lit.analysis_callbacks import ReferenceSAECallback, dense_lm
from lit_prune.models.activation_cache import weights_digest
from lit_prune.sae.build import build_training_sae

_RQ4 = ("rho", "survival_bin", "functional_rho", "functional_survival_bin")


class SurvivalResult(NamedTuple):
    metrics: dict[float | None, dict[str, float]]
    """Scalars keyed by their threshold: tau for geometric ones, the functional threshold for
    functional ones, None for threshold-free ones."""
    arrays: dict[str, torch.Tensor]
    """Per-feature arrays: reference-sized ones and `init_cosine` [n_module]."""


def _rq4(prefix: str, analysis: dict, with_feature: bool) -> dict[str, float]:
    """Flatten one `firing_rate_analysis` into scalars (CIs as _ci_lo / _ci_hi)."""
    names = ("rho_bin", "rho_feature") if with_feature else ("rho_bin",)
    out = {}
    for name in names:
        out[f"{prefix}{name}"], out[f"{prefix}{name}_p"] = analysis[name], analysis[f"{name}_p"]
        out[f"{prefix}{name}_ci_lo"], out[f"{prefix}{name}_ci_hi"] = analysis[f"{name}_ci"]
    out.update({f"{prefix}survival_bin{b}": v for b, v in enumerate(analysis["survival_by_bin"])})
    return out


def survival_measurements(
    ref_dec: torch.Tensor,
    module_dec: torch.Tensor,
    init_dec: torch.Tensor,
    paired: PairedPass,
    taus: tuple[float, ...] = (0.5, 0.7, 0.9),
    functional_threshold: float = 0.7,
    n_bins: int = 5,
    n_boot: int = 1000,
    seed_baseline: float | None = None,
    seed_baseline_tau: float = 0.7,
    near_init: float = 0.9,
    matching: str = "auto",
    candidates: int = 8,
) -> SurvivalResult:
    """RQ2 + RQ4 for one condition (no Lightning).

    ref_dec [n, d]: reference (dense-model) decoder; module_dec, init_dec [n', d]: the run's SAE
    decoder now and at initialisation; paired: the reference on the dense vs current LM. Alive =
    fires on the dense model (paired.rate_dense > 0); survival is over alive reference features.
    Geometric: S(tau) = fraction with matched cosine >= tau. Functional: fraction with r >= the
    threshold (NaN r = lost). RQ4: firing-rate bins of log10 p on the dense model, survival per
    bin, rho_bin and the feature-level Spearman(log10 p, c) with p-values and bootstrap CIs.
    `init_cosine` is each module feature's cosine to its own init (near-init latents "survive"
    trivially against a same-seed reference). matching / candidates: the one-to-one matching's
    solver and sparse candidate count (`lit_prune.analysis.matching.match_features`).
    """
    p = paired.rate_dense
    alive = p > 0
    geo = geometric_survival(ref_dec, module_dec, alive, taus, matching, candidates)
    func = survival_from_accumulator(paired.acc, functional_threshold)
    init_cos = (unit_rows(module_dec) * unit_rows(init_dec)).sum(1)
    partner = geo["partner"]
    partner_init = torch.full(partner.shape, float("nan"))
    partner_init[partner >= 0] = init_cos[partner[partner >= 0]]
    metrics: dict[float | None, dict[str, float]] = {}
    for tau in map(float, taus):
        analysis = firing_rate_analysis(geo["cosine"], p, tau, n_bins, n_boot)
        metrics[tau] = {"S": geo["S"][tau], **_rq4("", analysis, with_feature=False)}
        if seed_baseline is not None and math.isclose(tau, seed_baseline_tau):
            metrics[tau]["S_normalised"] = normalised_survival(geo["S"][tau], seed_baseline)
    # the feature-level Spearman(log10 p, c) does not depend on tau: taken from the last analysis
    feature_level = {k: v for k, v in _rq4("", analysis, True).items() if k.startswith("rho_feature")}
    r_alive = func.r[alive]
    metrics.setdefault(float(functional_threshold), {}).update(
        {
            "functional_S": func.fraction,
            "functional_mean_r": float(torch.nanmean(r_alive.double())) if alive.any() else float("nan"),
            **_rq4(
                "functional_", firing_rate_analysis(func.r, p, functional_threshold, n_bins, n_boot), True
            ),
        }
    )
    metrics[None] = {
        "mean_cosine": geo["mean_cosine"],
        "mmcs_reference_to_module": geo["mmcs_dense_to_pruned"],
        "mmcs_module_to_reference": geo["mmcs_pruned_to_dense"],
        **feature_level,
        "n_reference": float(p.numel()),
        "n_alive": float(alive.sum()),
        "n_module": float(init_cos.numel()),
        "eval_tokens": float(paired.tokens),
        "init_cosine_mean": float(init_cos.double().mean()),
        "init_near_fraction": float((init_cos >= near_init).double().mean()),
    }
    arrays = {
        "matched_cosine": geo["cosine"].float(),
        "partner": partner,
        "firing_rate": p.double(),
        "firing_rate_current": paired.rate_current.double(),
        "pearson_r": func.r.float(),
        "bin": firing_rate_bins(p, n_bins),
        "alive": alive,
        "partner_init_cosine": partner_init,
        "init_cosine": init_cos.float(),
        # RQ4's other fragility predictors (METHODS §4): on the dense model, per reference feature
        "max_activation": paired.acc.max_a.float().cpu(),
        "decoder_norm": ref_dec.double().norm(dim=-1).float(),
    }
    return SurvivalResult(metrics, arrays)


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

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.init_decoder is None and int(pl_module.tokens_trained) == 0:
            self.init_decoder = pl_module.sae.W_dec.detach().cpu().clone()

    def _init(self, module: L.LightningModule) -> torch.Tensor:
        """The module SAE's decoder at init; rebuilt from its seed when the fit resumed mid-training."""
        if self.init_decoder is None:
            fresh = build_training_sae(
                module.settings, module.lm.config.hidden_size, int(module.hparams.seed)
            )
            self.init_decoder = fresh.W_dec.detach().clone()
        return self.init_decoder

    def same_seed(self, module: L.LightningModule) -> bool:
        return self.reference_seed is not None and self.reference_seed == int(module.hparams.seed)

    def _paired(self, trainer: L.Trainer, module: L.LightningModule) -> PairedPass:
        """Reference on dense vs current LM; cached while the current LM's weights stay the same."""
        lm = module.lm_on_device()
        fingerprint = weights_digest(lm)
        if self._cache is None or self._cache[0] != fingerprint:
            ids = trainer.datamodule.eval_ids[: self.functional_sequences]
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

    def measure(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        paired = self._paired(trainer, module)
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
        experiment = getattr(trainer.logger, "experiment", None)
        if self.log_figures and hasattr(experiment, "add_figure"):
            when = f"epoch {epoch}" if stage == "validation" else "end of fit"
            title = f"{cond.method} s={cond.sparsity:g}, {when}, {'same' if same else 'cross'}-seed"
            for tag, fig in survival_figures(
                result, self.taus, self.functional_threshold, self.n_bins, title
            ).items():
                experiment.add_figure(tag, fig, global_step=trainer.global_step, close=True)


def survival_figures(
    result: SurvivalResult, taus: tuple[float, ...], functional_threshold: float, n_bins: int, title: str
) -> dict[str, Figure]:
    """Matched-cosine histogram, survival by firing-rate bin, firing-rate histogram (TensorBoard tags)."""
    a = result.arrays
    alive = a["alive"].numpy()
    cos = a["matched_cosine"].numpy()[alive]
    logp = np.log10(a["firing_rate"].numpy()[alive])
    edges = np.quantile(logp, np.linspace(0, 1, n_bins + 1)) if logp.size else np.zeros(n_bins + 1)

    hist = Figure(figsize=(6, 4))
    ax = hist.add_subplot()
    ax.hist(
        cos[~np.isnan(cos)],
        bins=40,
        range=(min(0.0, float(np.nanmin(cos, initial=0.0))), 1.0),
        color="tab:blue",
        label="alive reference features",
    )
    for tau, color in zip(taus, ("tab:orange", "tab:red", "tab:purple", "tab:green")):
        ax.axvline(tau, color=color, linestyle="--", label=f"τ = {tau:g}")
    ax.set(
        xlabel="matched decoder cosine to the run's SAE (dimensionless)",
        ylabel="features (count)",
        title=title,
    )
    ax.legend()

    bars = Figure(figsize=(7, 4))
    ax = bars.add_subplot()
    series = [
        (f"geometric, τ = {tau:g}", [result.metrics[tau][f"survival_bin{b}"] for b in range(n_bins)])
        for tau in taus
    ]
    func = result.metrics[float(functional_threshold)]
    series.append(
        (
            f"functional, r ≥ {functional_threshold:g}",
            [func[f"functional_survival_bin{b}"] for b in range(n_bins)],
        )
    )
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        ax.bar(
            np.arange(n_bins) + (i - (len(series) - 1) / 2) * width, np.nan_to_num(values), width, label=label
        )
    ax.set_xticks(range(n_bins), [f"[{edges[b]:.2f}, {edges[b + 1]:.2f}]" for b in range(n_bins)], fontsize=7)
    ax.set(
        xlabel="firing-rate bin: log10 p on the dense model (rarest → most frequent)",
        ylabel="surviving features (fraction)",
        ylim=(0, 1.05),
        title=title,
    )
    ax.legend(fontsize=7)

    rates = Figure(figsize=(6, 4))
    ax = rates.add_subplot()
    cur = a["firing_rate_current"].numpy()
    logp_cur = np.log10(cur[cur > 0])
    shared = np.histogram_bin_edges(np.concatenate([logp, logp_cur]), bins=40)  # same bins: comparable bars
    ax.hist(logp, bins=shared, alpha=0.6, label="dense model (alive features)")
    ax.hist(logp_cur, bins=shared, alpha=0.6, label="this run's model")
    for x in edges[1:-1]:
        ax.axvline(x, color="black", linestyle=":", linewidth=1)
    ax.plot([], [], color="black", linestyle=":", label="quantile bin edges (dense)")
    ax.set(
        xlabel="log10 firing rate (log10 fraction of eval tokens)",
        ylabel="reference features (count)",
        title=title,
    )
    ax.legend(fontsize=7)
    return {
        "rq2/matched_cosine_hist": hist,
        "rq4/survival_by_firing_rate_bin": bars,
        "rq4/firing_rate_hist": rates,
    }
