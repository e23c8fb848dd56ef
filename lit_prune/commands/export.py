"""`python -m lit_prune export <sae dir>... --out DIR --release NAME --repo_id ORG/NAME`: write SAEs
as a release in the layout of sae-lens' pretrained registry and Neuronpedia.

Each SAE folder (written by fit or a study, e.g. checkpoints/smollm2/dense/seed0/sae) becomes
<out>/<sae_id>/ with cfg.json and sae_weights.safetensors; <out>/README.md is the model card and
<out>/pretrained_saes.yaml the entry for sae-lens' registry. Upload <out> as the hub repo
--repo_id and add the entry to sae-lens' pretrained_saes.yaml: then
`SAE.from_pretrained(release, sae_id)` loads each SAE.
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lit_prune export",
        description=(__doc__ or "").split("\n\n")[0],
        epilog=(__doc__ or "").split("\n\n", 1)[1],
        allow_abbrev=False,
    )
    parser.add_argument(
        "sae_dirs", nargs="+", help="Exported SAE folders (cfg.json + sae_weights.safetensors)."
    )
    parser.add_argument("--out", required=True, help="The release folder to write (replaced if a release).")
    parser.add_argument("--release", required=True, help="The release name in pretrained_saes.yaml.")
    parser.add_argument("--repo_id", required=True, help="The hub repo (org/name) the folder is uploaded as.")
    parser.add_argument(
        "--sae_ids",
        nargs="+",
        default=None,
        help="One id per SAE folder (default: layer_<L>/<dense|method_sparsity>/seed_<s>).",
    )
    parser.add_argument(
        "--neuronpedia_model", default=None, help="Neuronpedia's model id, to fill each SAE's neuronpedia id."
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
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
