import math

import torch

from lit_prune.analysis.results import (
    ROW_KEYS,
    Condition,
    append_rows,
    make_rows,
    read_arrays,
    read_rows,
    write_arrays,
    write_rows,
)


def test_rows_round_trip_and_keep_non_finite_as_null(tmp_path):
    cond = Condition(
        model="m", hook="blocks.6.hook_resid_post", method="wanda", sparsity=0.5, seed_a=0, seed_b=1
    )
    rows = make_rows(cond, {"fvu": 0.25, "kl": math.nan}, tau=0.7)
    assert set(ROW_KEYS) <= set(rows[0]) and rows[0]["tau"] == 0.7
    write_rows(tmp_path / "r.json", rows)
    append_rows(tmp_path / "r.json", make_rows(cond, {"l0": 32}))
    back = read_rows(tmp_path / "r.json")
    assert [r["metric"] for r in back] == ["fvu", "kl", "l0"]
    assert back[0]["value"] == 0.25 and back[1]["value"] is None and back[2]["sparsity"] == 0.5
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_arrays_round_trip(tmp_path):
    cos = torch.rand(10)
    write_arrays(tmp_path / "a.safetensors", cosine=cos)
    assert torch.equal(read_arrays(tmp_path / "a.safetensors")["cosine"], cos)
