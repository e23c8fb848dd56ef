"""`python -m lit_prune export`: SAEs as a release that sae-lens' registry loads (the hub replaced by
the local folder; nothing else of sae-lens' loading is changed)."""

import torch
import yaml
from helpers import cli_in_process
from huggingface_hub.utils import EntryNotFoundError
from sae_lens import SAE
from sae_lens.loading import pretrained_sae_loaders, pretrained_saes_directory

from lit_prune.sae.build import SAESettings, build_training_sae
from lit_prune.sae.io import LensMetadata, export_sae


def _export(path, seed, method="dense", sparsity=0.0):
    sae = build_training_sae(SAESettings(architecture="topk", expansion=2, k=4), d_in=16, seed=seed)
    record = {
        "model": "tiny-llama",
        "hook_layer": 1,
        "seed": seed,
        "pruning": {"method": method, "sparsity": sparsity},
        "metrics_saebench": {"explained_variance": 0.8125, "l0": 4.0, "ce_loss_score": 0.9},
    }
    lens = LensMetadata(model_name="/models/tiny", context_size=32, prepend_bos=False, dataset_path="/corpus")
    return export_sae(sae, path, 1.5, record, lens)


def test_export_writes_a_release_sae_lens_loads(tmp_path, monkeypatch):
    dense, pruned = _export(tmp_path / "a", 0), _export(tmp_path / "b", 1, "wanda", 0.5)
    out = tmp_path / "release"
    args = (
        "export",
        str(dense),
        str(pruned),
        "--out",
        str(out),
        "--release",
        "tiny-rel",
        "--repo_id",
        "me/tiny",
    )
    code, err = cli_in_process(*args, "--neuronpedia_model", "tiny", cwd=tmp_path)
    assert code == 0, err
    ids = ["layer_1/dense/seed_0", "layer_1/wanda_0.5/seed_1"]
    entry = yaml.safe_load((out / "pretrained_saes.yaml").read_text())["tiny-rel"]
    assert entry["repo_id"] == "me/tiny" and entry["model"] == "/models/tiny"
    assert [s["id"] for s in entry["saes"]] == ids == [s["path"] for s in entry["saes"]]
    assert entry["saes"][0] == {**entry["saes"][0], "variance_explained": 0.8125, "l0": 4.0}
    assert entry["saes"][1]["neuronpedia"] == "tiny/layer_1-wanda_0.5-seed_1"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens") and "| `layer_1/wanda_0.5/seed_1` |" in card

    # sae-lens' own registry code on our entry: its yaml parser, then from_pretrained's loader
    monkeypatch.setattr(pretrained_saes_directory, "files", lambda package: out)
    pretrained_saes_directory.get_pretrained_saes_directory.cache_clear()

    def local(repo_id, filename, **kw):  # the hub, offline: the release folder as its repo
        assert repo_id == "me/tiny"
        if not (out / filename).is_file():
            raise EntryNotFoundError(filename)
        return str(out / filename)

    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", local)
    try:
        for sae_id, source in zip(ids, (dense, pruned), strict=True):
            loaded = SAE.from_pretrained("tiny-rel", sae_id, device="cpu")
            torch.testing.assert_close(loaded.W_dec, SAE.load_from_disk(source).W_dec)
            assert loaded.cfg.metadata.context_size == 32
    finally:
        pretrained_saes_directory.get_pretrained_saes_directory.cache_clear()


def test_export_refuses_duplicate_ids_and_foreign_folders(tmp_path):
    sae = _export(tmp_path / "a", 0)
    code, err = cli_in_process(
        "export",
        str(sae),
        str(sae),
        "--out",
        str(tmp_path / "r"),
        "--release",
        "r",
        "--repo_id",
        "me/r",
        cwd=tmp_path,
    )
    assert code == 2 and err.count("\n") == 1 and "sae_ids=" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, err = cli_in_process(
        "export",
        str(sae),
        "--out",
        str(tmp_path / "other"),
        "--release",
        "r",
        "--repo_id",
        "me/r",
        cwd=tmp_path,
    )
    assert code == 2 and "out=" in err and (tmp_path / "other" / "notes.txt").is_file()


def test_misspelt_or_abbreviated_option_is_one_line_naming_the_option(tmp_path):
    common = ("export", "sae", "--out", str(tmp_path / "r"), "--repo_id", "me/r")
    code, err = cli_in_process(*common, "--releas", "r", cwd=tmp_path)
    assert (code, err) == (2, "error: unknown option --releas: did you mean --release?\n")
    code, err = cli_in_process(*common, "--rel", "r", cwd=tmp_path)  # no silent abbreviation
    assert (code, err) == (2, "error: unknown option --rel: did you mean --release?\n")
    assert not (tmp_path / "r").exists()


def test_help_explains_every_option(capsys, tmp_path):
    from lit_prune.commands.export import build_parser

    code, _ = cli_in_process("export", "--help", cwd=tmp_path)
    out = capsys.readouterr().out
    assert code == 0
    for action in build_parser()._actions:
        assert action.help, action.option_strings
        assert all(option in out for option in action.option_strings)
