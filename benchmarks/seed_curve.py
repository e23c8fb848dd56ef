"""The seed-noise curve: dense cross-seed shared fraction S_seed(tau) against the SAE training budget.

Block --layer resid_post of the embedded model is harvested ONCE (positions >= 1, as every fit does;
`lit_prune.analysis.evaluate.harvest`, the LM in bfloat16 where the CPU has bf16 instructions, else float32)
and cached under --cache_dir/seed_curve/. The training inputs are scaled with the study's norm scale
(`fit_norm_scale` on the first 32 train sequences). Every grid point then trains two SAEs (seeds 0 and 1)
with the project's own step (`build_training_sae`, `fast_topk_training_forward`, fused Adam, the
`warmup_decay` schedule, b_dec started at the first batch's mean and the dead-latent window of
SAEModule) on a prefix of the cached tokens, drawn in a fresh seeded random order each pass (one pass =
one epoch), and measures, as the study's RQ1 step does (`seed_stability`, alive = fires on the eval
tokens): shared@0.5 / 0.7 / 0.9 of seed 0's alive features, MMCS both ways, and per SAE the eval FVU,
L0, dead fraction and the wall seconds of training.

Each finished point is appended to --output (JSON lines); a rerun skips the points already there.
`--docs` writes docs/seed_curve.md (table) and docs/img/seed_curve.png (figure) from that file.

Run from the repository root:
  python benchmarks/seed_curve.py --threads 2            # the whole grid (about 45 min on 2 cores)
  python benchmarks/seed_curve.py --quick                # two cheap points
  python benchmarks/seed_curve.py --points steps_1024,lr_1e-2_s1024
  python benchmarks/seed_curve.py --list                 # the grid's point names
  python benchmarks/seed_curve.py --docs                 # table + figure from the results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import ROOT, add_common_args, apply_threads, token_splits

from lit_prune.analysis.evaluate import harvest, sae_codec
from lit_prune.analysis.metrics import ReconstructionMetrics
from lit_prune.analysis.survival import TAUS, seed_stability
from lit_prune.errors import invalid
from lit_prune.files import atomic_path, write_text_atomic
from lit_prune.sae.buffer import fit_norm_scale
from lit_prune.sae.build import SAESettings, build_training_sae
from lit_prune.sae.fast import fast_topk_training_forward
from lit_prune.sae.schedule import warmup_decay

SEQ_LEN = 128
NORM_SEQUENCES = 32  # the study's model.norm_sequences
DOCS_MD = ROOT / "docs" / "seed_curve.md"
DOCS_PNG = ROOT / "docs" / "img" / "seed_curve.png"


@dataclass(frozen=True)
class CurvePoint:
    """One grid point: two SAEs (seeds 0 and 1) trained alike. Defaults: the study's dense SAE
    (4x width, TopK k 32, lr 3e-3, warm-up 5, decay over the last 20%, dead window 20k tokens)."""

    name: str
    """Unique label (the resume key is the settings, not the name)."""
    axis: str
    """Which curve the point belongs to: steps | tokens | lr | schedule | width | k | batch."""
    steps: int
    """Optimizer steps per SAE."""
    batch: int = 256
    """Activations per optimizer step."""
    tokens: int = 262_144
    """Distinct training activations: the first `tokens` of the cache (passes = steps * batch / tokens)."""
    lr: float = 3e-3
    """Peak Adam learning rate."""
    width: int = 2304
    """SAE latents d_sae."""
    k: int = 32
    """TopK active latents per token."""
    warmup: int = 5
    """Linear warm-up, in steps."""
    decay_fraction: float = 0.2
    """The lr decays linearly to 0 over this last fraction of the steps."""
    dead_window: int = 20_000
    """A latent silent for more than this many training tokens is dead (gets the auxiliary loss)."""

    def __post_init__(self) -> None:
        for field in ("steps", "batch", "tokens", "width", "k"):
            if getattr(self, field) < 1:
                raise invalid(f"point.{field}", getattr(self, field), "a positive integer")
        if not 0 <= self.decay_fraction <= 1:
            raise invalid("point.decay_fraction", self.decay_fraction, "a fraction in [0, 1]")

    def settings(self) -> dict:
        """What the result depends on: every field but the labels."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "axis")}

    @property
    def epochs(self) -> float:
        return self.steps * self.batch / self.tokens


def _grid() -> list[CurvePoint]:
    """The full grid, in run order: the decision-relevant points first, the dearest last."""
    P = CurvePoint
    return [
        *(P(f"steps_{s}", "steps", s) for s in (256, 1024, 2048)),
        P("lr_1e-2_s1024", "lr", 1024, lr=1e-2),
        P("width_1152_s2048", "width", 2048, width=1152),
        P("batch_128_s2048", "batch", 2048, batch=128),
        P("lr_1e-2_s2048", "lr", 2048, lr=1e-2),
        P("lr_1e-3_s2048", "lr", 2048, lr=1e-3),
        P("k_16_s2048", "k", 2048, k=16),
        P("steps_4096", "steps", 4096),
        P("tokens_2M_s4096", "tokens", 4096, tokens=2_097_152),
        P("tokens_65k_s4096", "tokens", 4096, tokens=65_536),
        P("tokens_131k_s4096", "tokens", 4096, tokens=131_072),
        P("lr_1e-3_s1024", "lr", 1024, lr=1e-3),
        P("k_64_s2048", "k", 2048, k=64),
        P("sched_const_s2048", "schedule", 2048, decay_fraction=0.0),
        P("sched_linear_s2048", "schedule", 2048, decay_fraction=1.0),
        P("tokens_1M_s4096", "tokens", 4096, tokens=1_048_576),
        P("width_4608_s2048", "width", 2048, width=4608),
        P("steps_8192", "steps", 8192),
        P("lr_1e-2_s4096", "lr", 4096, lr=1e-2),
        P("tokens_2M_s4096_b512", "tokens", 4096, batch=512, tokens=2_097_152),
    ]


GRID = _grid()
QUICK = ("steps_256", "steps_1024")


# --- activations --------------------------------------------------------------------------------
@dataclass
class Activations:
    """Cached block activations (unscaled, in the LM's dtype) and the study's input scale."""

    train: torch.Tensor
    """[n_train, d_model] train activations, document order (a prefix = the study's train_tokens)."""
    eval: torch.Tensor
    """[n_eval, d_model] held-out eval activations."""
    scale: float
    """Norm scale c (E||c x||^2 = d_model over the first NORM_SEQUENCES train sequences)."""
    info: dict
    """How they were made: model, layer, LM dtype, corpus provenance, harvest seconds."""


def _harvest_all(lm: torch.nn.Module, ids: torch.Tensor, layer: int, batch: int, label: str) -> torch.Tensor:
    """resid_post at positions >= 1 of every sequence of ids, in the LM's dtype: [n * (seq - 1), d]."""
    dtype, out, start = next(lm.parameters()).dtype, [], time.perf_counter()
    for i, chunk in enumerate(ids.split(batch)):
        out.append(harvest(lm, chunk, layer).to(dtype))  # a bf16 LM's output is exact in bf16
        if i % 50 == 0:
            done = (i + 1) * batch * (ids.shape[1] - 1)
            rate = done / (time.perf_counter() - start)
            print(f"harvest {label}: {done:,} tokens, {rate:,.0f} tok/s", flush=True)
    return torch.cat(out)


def load_activations(args: argparse.Namespace) -> Activations:
    """Harvest once, then reuse: the cache file's name carries every setting that changes it."""
    from lit_prune.models.registry import load_model, resolve_lm_dtype

    lm_dtype = resolve_lm_dtype(args.lm_dtype, "cpu")
    n_train = -(-args.tokens // (SEQ_LEN - 1))  # whole sequences: at least --tokens harvested positions
    n_eval = -(-args.eval_tokens // (SEQ_LEN - 1))
    key = f"{args.model}-L{args.layer}-{args.corpus}-{lm_dtype}-{n_train}x{SEQ_LEN}-eval{n_eval}"
    path = Path(args.cache_dir) / "seed_curve" / f"acts-{key}.pt"
    if path.is_file():
        print(f"activations from {path}", flush=True)
        return Activations(**torch.load(path, mmap=True))  # mapped: a run reads only the prefix it trains on
    dm = token_splits(
        args.model,
        args.corpus,
        seq_len=SEQ_LEN,
        train_tokens=n_train * SEQ_LEN,
        eval_tokens=n_eval * SEQ_LEN,
        cache_dir=args.cache_dir,
        model_cache_dir=args.model_cache_dir,
    )
    lm = load_model(args.model, dtype=lm_dtype, cache_dir=args.model_cache_dir)
    start = time.perf_counter()
    train = _harvest_all(lm, dm.train_ids, args.layer, args.harvest_batch, "train")
    evaluation = _harvest_all(lm, dm.eval_ids, args.layer, args.harvest_batch, "eval")
    seconds = time.perf_counter() - start
    scale = fit_norm_scale(train[: NORM_SEQUENCES * (SEQ_LEN - 1)].float())
    info = {
        "model": args.model,
        "layer": args.layer,
        "lm_dtype": lm_dtype,
        "corpus": dm.provenance,
        "harvest_seconds": seconds,
        "harvest_tokens_per_s": (train.shape[0] + evaluation.shape[0]) / seconds,
    }
    acts = Activations(train, evaluation, scale, info)
    with atomic_path(path) as tmp:
        torch.save(dataclasses.asdict(acts), tmp)
    print(f"harvested {train.shape[0]:,} + {evaluation.shape[0]:,} tokens in {seconds:.0f} s -> {path}")
    return acts


# --- training and measuring ---------------------------------------------------------------------
class _Order:
    """Indices into n rows, a fresh seeded permutation every pass, `batch` at a time."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.gen = n, torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.gen), 0

    def take(self, batch: int) -> torch.Tensor:
        parts = []
        while batch > 0:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            part = self.perm[self.pos : self.pos + batch]
            self.pos += len(part)
            batch -= len(part)
            parts.append(part)
        return torch.cat(parts)


def train_sae(
    point: CurvePoint, seed: int, train: torch.Tensor, scale: float
) -> tuple[torch.nn.Module, dict]:
    """One SAE trained as SAEModule._sae_step trains it, on inputs drawn from train[:point.tokens]."""
    if point.tokens > train.shape[0]:
        raise invalid("point.tokens", point.tokens, f"at most the {train.shape[0]:,} cached tokens")
    sae = build_training_sae(SAESettings(d_sae=point.width, k=point.k), train.shape[1], seed)
    opt = torch.optim.Adam(sae.parameters(), lr=point.lr, fused=True)
    sched = warmup_decay(opt, point.steps, point.warmup, point.decay_fraction)
    order = _Order(point.tokens, seed)
    since_fired = torch.zeros(point.width)
    start = time.perf_counter()
    for step in range(point.steps):
        x = train[order.take(point.batch)].float() * scale
        if step == 0:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))  # b_dec starts at the activation mean (docs/methods.md §2)
        out = fast_topk_training_forward(sae, x, since_fired > point.dead_window)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            since_fired += x.shape[0]
            since_fired.masked_fill_(out.fired, 0)
    seconds = time.perf_counter() - start
    return sae.eval(), {
        "seconds": seconds,
        "train_dead_fraction": float((since_fired > point.dead_window).float().mean()),
    }


@torch.no_grad()
def evaluate(sae: torch.nn.Module, acts: torch.Tensor, scale: float, chunk: int = 4096) -> dict:
    """Eval FVU, L0, dead fraction (never fires on the eval tokens) and the alive mask."""
    d_model, d_sae = acts.shape[1], sae.cfg.d_sae
    metrics, codec = ReconstructionMetrics(d_model, d_sae), sae_codec(sae, scale)
    for x in acts.split(chunk):
        feats, x_hat = codec(x.float())
        metrics.update(x.float(), x_hat, feats)
    values = {k: float(v) for k, v in metrics.compute().items() if k in ("fvu", "l0", "dead_fraction")}
    return {**values, "alive": metrics.firing_rates() > 0}


def measure_point(point: CurvePoint, acts: Activations, seeds: tuple[int, ...] = (0, 1)) -> dict:
    """Train one SAE per seed, evaluate each, match the pair: one result row."""
    decoders, alive, per_seed = [], [], []
    for seed in seeds:
        sae, fit = train_sae(point, seed, acts.train, acts.scale)
        ev = evaluate(sae, acts.eval, acts.scale)
        decoders.append(sae.W_dec.detach().float())
        alive.append(ev.pop("alive"))
        per_seed.append({"seed": seed, **fit, **ev})
        print(
            f"  {point.name} seed {seed}: {fit['seconds']:.1f} s, FVU {ev['fvu']:.4f}, "
            f"dead {ev['dead_fraction']:.3f}",
            flush=True,
        )
    pair = seed_stability(decoders, TAUS, alive=alive)["pairs"][0]
    mean = lambda key: sum(s[key] for s in per_seed) / len(per_seed)  # noqa: E731
    return {
        "name": point.name,
        "axis": point.axis,
        **point.settings(),
        "epochs": point.epochs,
        **{f"shared@{tau:g}": pair["shared"][tau] for tau in TAUS},
        "mmcs": (pair["mmcs_ij"] + pair["mmcs_ji"]) / 2,
        "mmcs_ij": pair["mmcs_ij"],
        "mmcs_ji": pair["mmcs_ji"],
        "mean_cosine": pair["mean_cosine"],
        "fvu": mean("fvu"),
        "l0": mean("l0"),
        "dead_fraction": mean("dead_fraction"),
        "train_dead_fraction": mean("train_dead_fraction"),
        "seconds_per_sae": mean("seconds"),
        "per_seed": per_seed,
        "load_average": list(os.getloadavg()),
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_kind(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


CPU_BF16, CPU_NO_BF16 = "x86 CPU with AVX-512 bf16", "x86 CPU without bf16 instructions"


def _cpu_kind() -> str:
    from lit_prune.models.registry import cpu_has_bf16

    return CPU_BF16 if cpu_has_bf16() else CPU_NO_BF16


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_curve(
    points: list[CurvePoint], acts: Activations, output: Path, extra: dict | None = None
) -> list[dict]:
    """Measure every point not yet in `output` (matched by settings and the harvest's LM dtype, which
    changes the activations), appending one JSON line each."""
    output.parent.mkdir(parents=True, exist_ok=True)
    dtype = (extra or {}).get("lm_dtype")
    for point in points:
        rows = read_rows(output)  # read again each time: runs side by side share the file
        if _resume_key(point.settings(), dtype) in {
            _resume_key(_settings_of(r), r.get("lm_dtype")) for r in rows
        }:
            print(f"{point.name}: done already, skipped", flush=True)
            continue
        row = {**measure_point(point, acts), **(extra or {})}
        with output.open("a") as f:  # one line per point: a killed run loses at most the point in hand
            f.write(json.dumps(row) + "\n")
        print(
            f"{point.name}: S_seed@0.5/0.7/0.9 {row['shared@0.5']:.3f}/{row['shared@0.7']:.3f}/"
            f"{row['shared@0.9']:.3f}, MMCS {row['mmcs']:.3f}, FVU {row['fvu']:.4f}, "
            f"{row['seconds_per_sae']:.0f} s/SAE",
            flush=True,
        )
    return read_rows(output)


def _resume_key(settings: dict, lm_dtype: str | None) -> str:
    return json.dumps({**settings, "lm_dtype": lm_dtype}, sort_keys=True)


def _settings_of(row: dict) -> dict:
    return {f.name: row.get(f.name) for f in dataclasses.fields(CurvePoint) if f.name not in ("name", "axis")}


# --- docs ---------------------------------------------------------------------------------------
TABLE_COLUMNS = (  # (header, row key, format)
    ("point", "name", "{}"),
    ("steps", "steps", "{:,}"),
    ("batch", "batch", "{}"),
    ("tokens", "tokens", "{:,}"),
    ("passes", "epochs", "{:.2g}"),
    ("lr", "lr", "{:g}"),
    ("decay", "decay_fraction", "{:g}"),
    ("width", "width", "{:,}"),
    ("k", "k", "{}"),
    ("S@0.5", "shared@0.5", "{:.3f}"),
    ("S@0.7", "shared@0.7", "**{:.3f}**"),
    ("S@0.9", "shared@0.9", "{:.3f}"),
    ("MMCS", "mmcs", "{:.3f}"),
    ("FVU", "fvu", "{:.4f}"),
    ("dead", "dead_fraction", "{:.3f}"),
    ("s / SAE", "seconds_per_sae", "{:.0f}"),
)
AXIS_ORDER = ("steps", "tokens", "lr", "schedule", "batch", "width", "k")


def _cpu_of(row: dict) -> str:
    """The CPU a row ran on; rows from before the field ran with --lm_dtype auto, so bf16 names it."""
    if "cpu" in row:
        return row["cpu"]
    return CPU_BF16 if row.get("lm_dtype") == "bfloat16" else CPU_NO_BF16


def _where(cpu: str, rows: list[dict]) -> str:
    """The machine and its load for the rows that ran on one CPU kind."""
    threads = "/".join(str(t) for t in sorted({r["torch_threads"] for r in rows}))
    loads = [r["load_average"][0] for r in rows]
    load = f"1-minute load average {min(loads):.1f}-{max(loads):.1f} at the points' ends"
    busy = max(loads) > 1.5 * max(r["torch_threads"] for r in rows)  # more runnable threads than ours
    state = f"other jobs shared the CPU ({load}): its seconds are upper bounds" if busy else f"idle ({load})"
    dtypes = ", ".join(sorted({r.get("lm_dtype", "?") for r in rows}))
    return f"{len(rows)} points on a 2-core {cpu}, LM in {dtypes}, torch threads {threads}, {state}"


def markdown(rows: list[dict], command: str) -> str:
    rows = sorted(
        rows,
        key=lambda r: (
            AXIS_ORDER.index(r["axis"]),
            r["steps"],
            r["tokens"],
            r["name"],
            str(r.get("lm_dtype")),
        ),
    )
    columns = list(TABLE_COLUMNS)
    mixed = len({r.get("lm_dtype") for r in rows}) > 1
    if mixed:  # the harvest's LM dtype (and with it the CPU) differs between rows: say which is which
        columns.insert(1, ("LM", "lm_dtype", "{}"))
    head = [c for c, _, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt.format(r.get(key, "?")) for _, key, fmt in columns) + " |" for r in rows]
    names = [r["name"] for r in rows]
    both = {n for n in names if names.count(n) > 1}
    groups = {}
    for r in rows:
        groups.setdefault(_cpu_of(r), []).append(r)
    return "\n".join(
        [
            "<!-- generated by benchmarks/seed_curve.py --docs; do not edit by hand -->",
            f"Made with `{command}` (then `python benchmarks/seed_curve.py --docs`): "
            + "; ".join(_where(cpu, g) for cpu, g in groups.items())
            + ". Seconds per SAE count training only and compare only within one CPU.",
            "SmolLM2-135M block 6, python-docs; activations harvested once per LM dtype"
            + (f" (column LM; {', '.join(sorted(both))} ran with both)" if both else "")
            + ". Each row: two SAEs (seeds 0, 1), same settings; S@τ = fraction of seed 0's alive features "
            "whose one-to-one matched decoder cosine in seed 1 is >= τ; MMCS = mean of both directions; "
            "FVU and dead fraction "
            f"on {rows[0].get('eval_tokens', 0):,} held-out tokens (mean of the two seeds); passes = steps x "
            "batch / tokens; decay = fraction of steps with linear lr decay (warm-up 5 steps).",
            "",
            *lines,
            "",
            "![S_seed(0.7) against the training budget](img/seed_curve.png)",
            "",
        ]
    )


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = CurvePoint("base", "steps", 1)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    panels = (
        ("steps", "optimizer steps (batch 256, 262k tokens)", "steps", {"batch": 256, "tokens": 262_144}),
        ("tokens", "training tokens (4,096 steps of 256)", "tokens", {"batch": 256, "steps": 4096}),
    )
    for ax, (_, label, xkey, fixed) in zip(axes, panels, strict=False):
        same = {k: getattr(base, k) for k in ("lr", "width", "k", "warmup", "decay_fraction", "dead_window")}
        pts = sorted(
            (r for r in rows if all(r[k] == v for k, v in {**same, **fixed}.items())), key=lambda r: r[xkey]
        )
        dtypes = sorted({r.get("lm_dtype") for r in pts}, key=str)
        for n, dtype in enumerate(dtypes):  # one line per harvest dtype: all τ for the first, τ 0.7 after
            line = [r for r in pts if r.get("lm_dtype") == dtype]
            taus = ((0.5, "s--"), (0.7, "o-"), (0.9, "^:")) if n == 0 else ((0.7, "D-."),)
            for tau, style in taus:
                name = f"τ = {tau:g}" + (f", LM {dtype}" if len(dtypes) > 1 else "")
                ax.plot([r[xkey] for r in line], [r[f"shared@{tau:g}"] for r in line], style, label=name)
        for r in pts:
            ax.annotate(
                f"{r['seconds_per_sae']:.0f} s",
                (r[xkey], r["shared@0.7"]),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=8,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("dense S_seed(τ), seeds 0 vs 1")
        ax.axhline(0.25, color="grey", lw=0.8, ls=":")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[2]
    for axis in AXIS_ORDER:
        pts = [r for r in rows if r["axis"] == axis]
        if not pts:
            continue
        ax.scatter([r["seconds_per_sae"] for r in pts], [r["shared@0.7"] for r in pts], label=axis, s=22)
        for r in pts:
            ax.annotate(
                r["name"],
                (r["seconds_per_sae"], r["shared@0.7"]),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
    ax.axhline(0.25, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("wall seconds per SAE (training only)")
    ax.set_ylabel("dense S_seed(0.7)")
    ax.set_title("every point: cost against S_seed(0.7)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _one_change_panel(axes[3], rows)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _one_change_panel(ax, rows: list[dict], steps: int = 2048) -> None:
    """S_seed(0.7) of the points that change one setting of the `steps`-step default, beside it."""
    base = CurvePoint("base", "steps", steps).settings()
    points = sorted(
        (r for r in rows if r["steps"] == steps and sum(r[k] != v for k, v in base.items()) <= 1),
        key=lambda r: (r["axis"] != "steps", AXIS_ORDER.index(r["axis"]), r["name"]),
    )
    y = range(len(points))
    ax.barh(
        y, [r["shared@0.7"] for r in points], color=["grey" if r["axis"] == "steps" else "C0" for r in points]
    )
    ax.set_yticks(y, [r["name"] for r in points], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("dense S_seed(0.7)")
    ax.set_title(f"one setting changed at {steps:,} steps (grey: the default)", fontsize=9)
    ax.grid(alpha=0.3, axis="x")


def write_docs(output: Path, md: Path = DOCS_MD, png: Path = DOCS_PNG, command: str = "") -> None:
    rows = read_rows(output)
    if not rows:
        raise invalid("--output", str(output), "a result file with at least one point (run the grid first)")
    command = command or "python benchmarks/seed_curve.py --threads 2 --points NAME[,NAME]"
    write_text_atomic(md, markdown(rows, command))
    figure(rows, png)
    print(f"wrote {md} and {png}")


# --- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="python-docs")
    p.add_argument("--layer", type=int, default=6, help="hooked block")
    p.add_argument("--tokens", type=int, default=2_097_152, help="train activations to harvest")
    p.add_argument("--eval_tokens", type=int, default=32_768, help="held-out activations to harvest")
    p.add_argument(
        "--lm_dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="LM dtype of the harvest (auto: bfloat16 where the CPU has bf16 instructions)",
    )
    p.add_argument("--harvest_batch", type=int, default=32, help="sequences per LM forward")
    p.add_argument("--points", help="comma-separated point names (default: the whole grid)")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--list", action="store_true", help="print the grid and exit")
    p.add_argument("--docs", action="store_true", help="write the table and figure from --output and exit")
    add_common_args(p, "seed_curve")
    args = p.parse_args(argv)
    if args.output.suffix == ".json":  # common's default; one JSON line per point here
        args.output = args.output.with_suffix(".jsonl")
    return args


def select(names: str | None, quick: bool) -> list[CurvePoint]:
    if quick:
        names = ",".join(QUICK)
    if not names:
        return GRID
    by_name = {p.name: p for p in GRID}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    for n in wanted:
        if n not in by_name:
            raise invalid("--points", n, "names from --list")
    return [by_name[n] for n in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for p in GRID:
            print(f"{p.name:24s} {p.axis:9s} {p.epochs:6.2f} passes  {p.settings()}")
        return 0
    if args.docs:
        write_docs(args.output)
        return 0
    apply_threads(args)
    points = select(args.points, args.quick)
    acts = load_activations(args)
    extra = {
        "lm_dtype": acts.info["lm_dtype"],
        "eval_tokens": int(acts.eval.shape[0]),
        "norm_scale": acts.scale,
        "corpus_fingerprint": acts.info["corpus"].get("fingerprint"),
    }
    cached = acts.train.shape[0]
    for p in points:
        if p.tokens > cached:
            print(f"{p.name}: needs {p.tokens:,} tokens, {cached:,} cached (raise --tokens): skipped")
    # keep only the prefix the points read: several runs side by side then fit in memory
    acts.train = acts.train[: max((p.tokens for p in points), default=0)].clone()
    start = time.perf_counter()
    run_curve([p for p in points if p.tokens <= cached], acts, args.output, extra)
    print(f"done in {time.perf_counter() - start:.0f} s -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
