import json

import pytest
import torch
from sae_lens import SAE

from lit_prune.errors import LitPruneError
from lit_prune.sae.buffer import ActivationBuffer, fit_norm_scale
from lit_prune.sae.build import SAESettings, build_training_sae
from lit_prune.sae.io import check_compatible, export_sae, load_sae
from lit_prune.sae.schedule import lr_factor, sae_steps


def _trained_like(architecture):
    """A training SAE with perturbed weights (thresholds left alone)."""
    sae = build_training_sae(SAESettings(architecture=architecture, expansion=4, k=4), d_in=16, seed=3)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            param = getattr(sae, name)
            param.add_(0.05 * torch.randn_like(param))
    return sae


# batchtopk is exported as a JumpReLU (a fixed threshold replaces the batch-level top-k), so its
# inference outputs are not the training outputs by design; its weights are checked below.
@pytest.mark.parametrize("architecture", ["topk", "standard", "jumprelu"])
def test_export_then_load_from_disk_gives_identical_outputs(tmp_path, architecture):
    sae = _trained_like(architecture)
    c = 2.5
    export_sae(sae, tmp_path / "sae", c, {"model": "m", "hook_layer": 1, "seed": 3})
    loaded = SAE.load_from_disk(tmp_path / "sae")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats_train = sae.encode(x * c)
        expected = sae.decode(feats_train) / c
        feats_loaded = loaded.encode(x)
        torch.testing.assert_close(loaded.decode(feats_loaded), expected, rtol=1e-5, atol=1e-5)
    assert loaded.cfg.architecture() == architecture
    meta = json.loads((tmp_path / "sae" / "lit_prune.json").read_text())
    assert meta["norm_scale"] == c and meta["seed"] == 3 and "torch" in meta["versions"]
    assert loaded.cfg.metadata.hook_name == "model.layers.1"  # sae-lens on the HF model
    assert loaded.cfg.metadata.hook_name_transformer_lens == "blocks.1.hook_resid_post"


def test_batchtopk_exports_folded_weights_as_jumprelu(tmp_path):
    sae = _trained_like("batchtopk")
    loaded = SAE.load_from_disk(export_sae(sae, tmp_path / "sae", 2.0, {"model": "m", "hook_layer": 0}))
    assert loaded.cfg.architecture() == "jumprelu"
    unit = lambda w: w / w.norm(dim=1, keepdim=True)  # noqa: E731  (sae-lens may fold decoder norms)
    torch.testing.assert_close(unit(loaded.W_dec), unit(sae.W_dec))
    torch.testing.assert_close(loaded.b_dec, sae.b_dec / 2.0)


def test_same_seed_same_init_different_seed_differs():
    a = build_training_sae(SAESettings(expansion=2, k=2), 8, seed=1)
    b = build_training_sae(SAESettings(expansion=2, k=2), 8, seed=1)
    c = build_training_sae(SAESettings(expansion=2, k=2), 8, seed=2)
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, c.W_dec)


def test_unknown_architecture_is_one_line_error():
    with pytest.raises(LitPruneError, match="sae.architecture='gated' is invalid: expected one of topk"):
        SAESettings(architecture="gated")


def test_truncated_or_foreign_files_are_one_line_errors(tmp_path):
    sae = build_training_sae(SAESettings(expansion=2, k=2), 8, seed=0)
    path = export_sae(sae, tmp_path / "sae", 1.0, {"model": "m", "hook_layer": 0})
    weights = path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LitPruneError, match="not a loadable sae-lens SAE"):
        load_sae(path)
    (tmp_path / "junk").mkdir()
    with pytest.raises(LitPruneError, match="sae_path="):
        load_sae(tmp_path / "junk")


def test_reference_must_match_model_width_and_hook(tmp_path):
    sae = build_training_sae(SAESettings(expansion=2, k=2), 8, seed=0)
    loaded, meta = load_sae(export_sae(sae, tmp_path / "sae", 1.0, {"model": "m", "hook_layer": 2}))
    check_compatible(loaded, meta, d_model=8, layer=2)
    with pytest.raises(LitPruneError, match="reference_sae.d_in=8"):
        check_compatible(loaded, meta, d_model=16, layer=2)
    with pytest.raises(LitPruneError, match="reference_sae.hook_layer=2"):
        check_compatible(loaded, meta, d_model=8, layer=3)


def test_norm_scale_makes_mean_squared_norm_d_model():
    x = 7.0 * torch.randn(1000, 12)
    c = fit_norm_scale(x)
    assert (c * x).pow(2).sum(-1).mean().item() == pytest.approx(12.0, rel=1e-6)


def test_buffer_pops_each_row_exactly_once():
    buffer = ActivationBuffer(capacity=8, seed=0)
    buffer.add(torch.arange(10.0).unsqueeze(1))
    assert buffer.full()
    seen = torch.cat([buffer.pop(4), buffer.pop(4), buffer.pop(4)])
    assert sorted(seen.squeeze(1).tolist()) == list(range(10)) and len(buffer) == 0


def test_lr_schedule_warmup_constant_decay():
    factors = [lr_factor(step, total=10, warmup=2, decay_fraction=0.2) for step in range(10)]
    assert factors == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5]


def test_sae_steps_counts_harvested_tokens_per_sae_batch():
    assert sae_steps(16, 32 * 127, 1024) == 64  # 65,024 tokens: 63 steps + a drained half batch
    assert sae_steps(10, 100, 300) == 3  # 1000 tokens: 3 full steps, a third left over is dropped
    assert sae_steps(10, 100, 400) == 3  # 2 full steps; the half batch left is drained as a third
    assert sae_steps(10, 100, 800) == 1  # 200 left < half a batch: dropped
    assert sae_steps(1, 1, 4096) == 1


def test_buffer_interleaved_adds_and_pops_keep_every_row_once_and_resume():
    """Holes filled from the tail: popped + held == added, no row twice; a state_dict round-trip
    continues exactly like the uninterrupted buffer."""
    gen = torch.Generator().manual_seed(1)
    buffer, resumed, added, popped = ActivationBuffer(capacity=20, seed=3), None, 0, []
    for step in range(30):
        m = int(torch.randint(1, 12, (1,), generator=gen))
        rows = torch.arange(added, added + m, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
        added += m
        for buf in [b for b in (buffer, resumed) if b is not None]:
            buf.add(rows)
        while buffer.full():
            batch = buffer.pop(7)
            if resumed is not None:
                assert torch.equal(resumed.pop(7), batch)
            popped += batch[:, 0].tolist()
        if step == 10:
            resumed = ActivationBuffer(capacity=20, seed=99)
            resumed.load_state_dict(buffer.state_dict())
    held = buffer.rows[:, 0].tolist()
    assert sorted(popped + held) == list(range(added)) and len(buffer) == len(held) < 20
    assert torch.equal(resumed.rows, buffer.rows)
