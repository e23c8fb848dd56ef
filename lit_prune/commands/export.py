"""`python -m lit_prune export <sae dir>... --out DIR --release NAME --repo_id ORG/NAME`: write SAEs
as a release in the layout of sae-lens' pretrained registry and Neuronpedia.

Each SAE folder (written by fit or a study, e.g. checkpoints/smollm2/dense/seed0/sae) becomes
<out>/<sae_id>/ with cfg.json and sae_weights.safetensors; <out>/README.md is the model card and
<out>/pretrained_saes.yaml the entry for sae-lens' registry. Upload <out> as the hub repo
--repo_id and add the entry to sae-lens' pretrained_saes.yaml: then
`SAE.from_pretrained(release, sae_id)` loads each SAE.
"""

from __future__ import annotations

_DOC = __doc__ or ""


def build_parser():
    """The jsonargparse parser (the style of `report`): SAE folders as positionals, or from --config."""
    from jsonargparse import (
        ActionConfigFile,  # pyright: ignore[reportPrivateImportUsage] (left out of __all__)
        ArgumentParser,
    )

    parser = ArgumentParser(
        prog="python -m lit_prune export",
        description=_DOC.split("\n\n")[0].replace("\n", " "),
        epilog=_DOC.split("\n\n", 1)[1].replace("\n", " "),
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="A YAML file with these options (sae_dirs: [...], out: ...).",
    )
    parser.add_argument(
        "sae_dirs",
        type=str,
        nargs="+",
        help="SAE folders written by fit or a study (cfg.json + sae_weights.safetensors + lit_prune.json), "
        "e.g. checkpoints/smollm2/dense/seed0/sae.",
    )
    parser.add_argument(
        "--out", type=str, required=True, help="The release folder to write (replaced if it holds a release)."
    )
    parser.add_argument(
        "--release", type=str, required=True, help="The release name in pretrained_saes.yaml."
    )
    parser.add_argument(
        "--repo_id", type=str, required=True, help="The hub repo (org/name) the folder is uploaded as."
    )
    parser.add_argument(
        "--sae_ids",
        type=str,
        nargs="+",
        default=None,
        help="One id per SAE folder, in their order; without it, layer_<L>/<dense|method_sparsity>/seed_<s>.",
    )
    parser.add_argument(
        "--neuronpedia_model",
        type=str | None,
        default=None,
        help="Neuronpedia's model id, to fill each SAE's neuronpedia id.",
    )
    return parser


def parse_options(argv: list[str]):
    """argv (after `export`) -> the parsed options; parser errors become one-line LitPruneErrors."""
    from lit_prune.cli_manners import parse_one_line

    return parse_one_line(build_parser(), argv, "export")


def main(argv: list[str]) -> int:
    """Entry point of `python -m lit_prune export ARGS`; bad input raises LitPruneError (exit 2)."""
    args = parse_options(argv)
    from lit_prune.errors import invalid
    from lit_prune.sae.release import read_entry, write_release

    if args.sae_ids is not None and len(args.sae_ids) != len(args.sae_dirs):
        raise invalid("sae_ids", args.sae_ids, f"{len(args.sae_dirs)} ids, one per SAE folder")
    ids = args.sae_ids or [None] * len(args.sae_dirs)
    entries = [read_entry(path, sae_id) for path, sae_id in zip(args.sae_dirs, ids, strict=True)]
    out = write_release(entries, args.out, args.release, args.repo_id, args.neuronpedia_model)
    print(
        f"release {args.release}: {len(entries)} SAEs in {out} (model card README.md, pretrained_saes.yaml)"
    )
    return 0
