import pytest
import torch

from lit_prune.errors import LitPruneError
from lit_prune.models import hooks
from lit_prune.models.hooks import (
    capture_resid_post,
    check_layer,
    decoder_layers,
    resume_after,
    splice_resid_post,
    valid_positions,
)
from lit_prune.models.registry import load_model


@pytest.fixture(scope="module")
def model_and_ids(tiny_dir):
    model = load_model(str(tiny_dir))
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_capture_equals_hidden_states(model_and_ids):
    model, ids = model_and_ids
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    n = len(decoder_layers(model))
    for layer in range(n - 1):  # hidden_states[-1] is post-final-norm, so the last block differs by design
        torch.testing.assert_close(capture_resid_post(model, ids, layer), hidden[layer + 1], rtol=0, atol=0)
        torch.testing.assert_close(
            capture_resid_post(model, ids, layer, stop=False), hidden[layer + 1], rtol=0, atol=0
        )


def test_stop_after_block_skips_later_blocks(model_and_ids):
    model, ids = model_and_ids
    calls = []
    handle = decoder_layers(model)[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        capture_resid_post(model, ids, 0)
    finally:
        handle.remove()
    assert calls == []


def test_splice_identity_reproduces_logits(model_and_ids):
    model, ids = model_and_ids
    clean = model(input_ids=ids).logits
    with splice_resid_post(model, 1, lambda x: x.clone()):
        spliced = model(input_ids=ids).logits
    torch.testing.assert_close(spliced, clean, rtol=0, atol=0)


def test_splice_changes_only_later_positions(model_and_ids):
    model, ids = model_and_ids
    clean = model(input_ids=ids).logits

    def zero_from_10(x):
        x = x.clone()
        x[:, 10:] = 0
        return x

    with splice_resid_post(model, 1, zero_from_10):
        spliced = model(input_ids=ids).logits
    torch.testing.assert_close(spliced[:, :10], clean[:, :10], rtol=0, atol=0)
    assert (spliced[:, 10:] - clean[:, 10:]).abs().max() > 1e-3


def _count_block_runs(model, monkeypatch) -> list[int]:
    """Counts runs of the blocks' real forward (the class method `resume_after` stands in for)."""
    runs = [0]
    cls = type(decoder_layers(model)[0])
    real = cls.forward

    def counted(self, *args, **kwargs):
        runs[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counted)
    return runs


@pytest.mark.parametrize("padded", [False, True])
def test_resume_after_gives_the_same_bits_and_skips_early_blocks(model_and_ids, padded, monkeypatch):
    model, ids = model_and_ids
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 30:] = 0
    n = len(decoder_layers(model))
    clean = model(input_ids=ids, attention_mask=mask).logits
    for layer in range(n - 1):
        resid = capture_resid_post(model, ids, layer, mask)
        edited = resid.clone()
        edited[:, 10:] *= 0.5
        with splice_resid_post(model, layer, lambda x, edited=edited: edited):
            spliced = model(input_ids=ids, attention_mask=mask).logits
        with monkeypatch.context() as patch:
            runs = _count_block_runs(model, patch)
            with resume_after(model, layer, resid):
                resumed = model(input_ids=ids, attention_mask=mask).logits
            with resume_after(model, layer, edited):
                resumed_edit = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(resumed, clean, rtol=0, atol=0)
        torch.testing.assert_close(resumed_edit, spliced, rtol=0, atol=0)
        assert not torch.equal(resumed_edit, clean)
        assert runs == [2 * (n - layer - 1)]  # only the blocks after `layer`, in each of the two forwards
    assert all("forward" not in block.__dict__ for block in decoder_layers(model))


def test_resume_after_restores_blocks_after_an_error(model_and_ids):
    model, ids = model_and_ids
    clean = model(input_ids=ids).logits
    resid = capture_resid_post(model, ids, 1)
    with pytest.raises(RuntimeError, match="boom"):
        with resume_after(model, 1, resid):
            raise RuntimeError("boom")
    assert all("forward" not in block.__dict__ for block in decoder_layers(model))
    torch.testing.assert_close(model(input_ids=ids).logits, clean, rtol=0, atol=0)


def test_resume_after_an_unseen_block_class_runs_every_block(model_and_ids, monkeypatch):
    model, ids = model_and_ids
    clean = model(input_ids=ids).logits
    resid = capture_resid_post(model, ids, 1)
    monkeypatch.setattr(hooks, "_RETURNS_TUPLE", {})
    runs = _count_block_runs(model, monkeypatch)
    with resume_after(model, 1, resid):
        resumed = model(input_ids=ids).logits
    torch.testing.assert_close(resumed, clean, rtol=0, atol=0)
    assert runs == [len(decoder_layers(model))]


def test_valid_positions_excludes_first_and_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    expected = torch.tensor([[False, True, True, False], [False, True, True, True]])
    assert torch.equal(valid_positions(mask), expected)


def test_block_out_of_range_is_one_line_error(model_and_ids):
    model, _ = model_and_ids
    n = len(decoder_layers(model))
    with pytest.raises(
        LitPruneError, match=rf"hook_layer={n} is invalid: expected a block index in \[0, {n - 1}\]"
    ):
        check_layer(model, n)
