"""benchmarks/seed_curve.py's core on random activations: two tiny points, their rows, resume, docs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import seed_curve  # noqa: E402
from seed_curve import Activations, CurvePoint, read_rows, run_curve, write_docs  # noqa: E402

from lit_prune.errors import LitPruneError  # noqa: E402

D = 8


@pytest.fixture
def acts() -> Activations:
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(12, D, generator=gen)  # a few directions, sparsely mixed: something to learn
    mix = lambda n: torch.randn(n, 12, generator=gen).relu() * (torch.rand(n, 12, generator=gen) < 0.3)  # noqa: E731
    return Activations(mix(512) @ basis, mix(256) @ basis, 1.0, {"lm_dtype": "float32"})


POINTS = [
    CurvePoint("a", "steps", 8, batch=32, tokens=128, width=16, k=4, dead_window=64),
    CurvePoint("b", "width", 12, batch=16, tokens=256, width=24, k=2, lr=1e-2, decay_fraction=1.0),
]


def test_rows_resume_and_docs(acts, tmp_path, monkeypatch) -> None:
    out = tmp_path / "curve.jsonl"
    rows = run_curve(POINTS, acts, out, {"eval_tokens": 256})
    assert [r["name"] for r in rows] == ["a", "b"] and len(read_rows(out)) == 2
    for r in rows:
        shared = [r[f"shared@{t}"] for t in (0.5, 0.7, 0.9)]
        assert all(0 <= s <= 1 for s in shared) and shared[0] >= shared[1] >= shared[2]
        for key in ("mmcs", "mmcs_ij", "mmcs_ji", "dead_fraction", "train_dead_fraction"):
            assert 0 <= r[key] <= 1, key
        assert r["fvu"] >= 0 and r["seconds_per_sae"] > 0 and len(r["per_seed"]) == 2
        assert [s["seed"] for s in r["per_seed"]] == [0, 1]
    assert rows[0]["epochs"] == 8 * 32 / 128 and rows[1]["epochs"] == 12 * 16 / 256
    assert rows[1]["l0"] <= 2  # TopK: at most k active latents per token

    # a rerun measures nothing (the name does not matter, the settings do) and appends nothing
    monkeypatch.setattr(seed_curve, "measure_point", lambda *a, **k: pytest.fail("remeasured a done point"))
    renamed = [CurvePoint("renamed", p.axis, **p.settings()) for p in POINTS]
    assert len(run_curve(renamed, acts, out)) == 2 and len(read_rows(out)) == 2
    # activations of another LM dtype are another point: measured again, and the docs say which is which
    monkeypatch.setattr(seed_curve, "measure_point", lambda point, _: {**rows[0], "name": point.name})
    rows = run_curve(POINTS[:1], acts, out, {"lm_dtype": "bfloat16"})
    assert len(rows) == 3 and rows[2]["lm_dtype"] == "bfloat16"

    md, png = tmp_path / "curve.md", tmp_path / "img" / "curve.png"
    write_docs(out, md, png, command="test")
    text = md.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 4 and png.stat().st_size > 0  # header + three rows
    assert table[0].startswith("| point | LM |") and "a ran with both" in text
    assert json.loads(out.read_text().splitlines()[0])["name"] == "a"


def test_same_seed_is_deterministic_and_bad_points_are_one_line_errors(acts) -> None:
    first, _ = seed_curve.train_sae(POINTS[0], 0, acts.train, acts.scale)
    again, _ = seed_curve.train_sae(POINTS[0], 0, acts.train, acts.scale)
    torch.testing.assert_close(first.W_dec, again.W_dec, rtol=0, atol=0)
    with pytest.raises(LitPruneError, match="point.tokens"):
        seed_curve.train_sae(CurvePoint("x", "tokens", 2, tokens=10_000), 0, acts.train, acts.scale)
    with pytest.raises(LitPruneError, match="point.steps"):
        CurvePoint("x", "steps", 0)
