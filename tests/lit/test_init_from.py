"""SAEModule's warm start (init_from, RQ2c) and max_sae_steps on a tiny model."""

import pytest
import torch
from helpers import tiny_fit_args
from sae_lens import SAE

from lit_prune.cli import lightning_cli
from lit_prune.errors import LitPruneError
from lit_prune.lit.sae_module import SAEModule

pytestmark = pytest.mark.e2e  # Lightning fits (in process): the end-to-end lane


def _fit(tmp_path, corpus, model_cache, export, *extra):
    return lightning_cli(
        tiny_fit_args(
            tmp_path,
            corpus,
            model_cache,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            f"--model.export_dir={export}",
            *extra,
        )
    )


@pytest.fixture(scope="module")
def dense(tmp_path_factory, local_corpus, model_cache):
    tmp = tmp_path_factory.mktemp("init_from")
    cli = _fit(tmp, local_corpus, model_cache, tmp / "sae")
    return tmp, cli


def test_warm_start_begins_at_the_source_sae(dense, model_cache):
    tmp, cli = dense
    source = cli.model
    warm = SAEModule(
        model_name="tiny-llama",
        hook_layer=1,
        sae=source.settings,
        seed=5,
        init_from=str(tmp / "sae"),
        model_cache_dir=str(model_cache),
    )
    # the exact training parametrisation (decoder norms recorded in the export) and the same c
    for name, value in source.sae.state_dict().items():
        torch.testing.assert_close(warm.sae.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert warm.norm_scale.item() == pytest.approx(source.norm_scale.item())
    # FVU at step 0: the warm SAE reconstructs the eval activations exactly as the source does
    x = source.harvest(cli.datamodule.eval_ids[:4])
    _, want = source.encode_decode(x)
    _, got = warm.encode_decode(x)
    fvu = lambda xh: ((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()  # noqa: E731
    assert fvu(got) == pytest.approx(fvu(want), rel=1e-5)
    exported = SAE.load_from_disk(tmp / "sae")
    with torch.no_grad():
        torch.testing.assert_close(got, exported.decode(exported.encode(x)), rtol=1e-4, atol=1e-4)


def test_unit_norm_fallback_is_the_same_function(dense, model_cache):
    """An export without recorded decoder norms unfolds to unit-norm rows: same SAE, other parametrisation."""
    import json

    tmp, cli = dense
    meta_path = tmp / "sae" / "lit_prune.json"
    original = meta_path.read_text()
    meta = json.loads(original)
    del meta["decoder_norms"]
    try:
        meta_path.write_text(json.dumps(meta))
        warm = SAEModule(
            model_name="tiny-llama",
            hook_layer=1,
            sae=cli.model.settings,
            init_from=str(tmp / "sae"),
            model_cache_dir=str(model_cache),
        )
    finally:
        meta_path.write_text(original)
    norms = warm.sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    x = cli.model.harvest(cli.datamodule.eval_ids[:2])
    torch.testing.assert_close(warm.encode_decode(x)[1], cli.model.encode_decode(x)[1], rtol=1e-4, atol=1e-5)


def test_max_sae_steps_stops_the_warm_fit(dense, local_corpus, model_cache):
    tmp, cli = dense
    warm = _fit(
        tmp,
        local_corpus,
        model_cache,
        tmp / "warm",
        f"--model.init_from={tmp / 'sae'}",
        "--model.max_sae_steps=3",
        "--trainer.max_epochs=2",
    ).model
    assert warm.global_step == 3 and int(warm.tokens_trained) == 3 * 256
    assert warm.lr_schedulers().last_epoch == 3
    moved = torch.nn.functional.cosine_similarity(warm.sae.W_dec, cli.model.sae.W_dec, dim=-1)
    assert 0.5 < moved.min() and moved.mean() < 1  # 3 small steps from the source: moved, not far


@pytest.mark.parametrize(
    "kwargs, field",
    [({"sae": {"expansion": 2}}, "model.init_from"), ({"norm_scale": 123.0}, "model.norm_scale")],
)
def test_a_mismatched_source_is_one_line_error(dense, model_cache, kwargs, field):
    from lit_prune.sae.build import SAESettings

    tmp, cli = dense
    settings = SAESettings(**{**vars(cli.model.settings), **kwargs.pop("sae", {})})
    with pytest.raises(LitPruneError, match=field) as err:
        SAEModule(
            model_name="tiny-llama",
            hook_layer=1,
            sae=settings,
            init_from=str(tmp / "sae"),
            model_cache_dir=str(model_cache),
            **kwargs,
        )
    assert "\n" not in str(err.value)
