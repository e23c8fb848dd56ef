"""Full fine-tuning vs LoRA as the masked recovery of one pruned model: both perplexities.

Prunes the embedded model (--method, --sparsity; skipped when --pruned already holds a pruned model),
then runs the same recovery twice through the LightningCLI (configs/smollm2.yaml + configs/recovery.yaml,
--steps optimizer steps, mode full and mode lora with --lora_rank), and prints the eval perplexity of the
pruned model and of both recovered exports (each export's recovery.json, which also holds its realised
sparsity), and how many of the pruned weights are nonzero in each export as read back from disk. Every
run is an ordinary `python -m lit_prune` process; nothing but that read-back is done in-process.

Run from the repository root (the embedded SmolLM2-135M on a CPU takes minutes per 100 steps):
  python benchmarks/recovery_modes.py --steps 200
  python benchmarks/recovery_modes.py --steps 200 --lora_lr 2e-4 --lora_rank 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> None:
    print("$ python -m lit_prune " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "lit_prune", *args], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--pruned", default="checkpoints/pruned/wanda-0.5", help="pruned model directory")
    p.add_argument("--method", default="wanda", help="pruning method when --pruned does not exist yet")
    p.add_argument("--sparsity", type=float, default=0.5, help="sparsity when --pruned does not exist yet")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each recovery")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate of the full fine-tune")
    p.add_argument("--lora_lr", type=float, default=2e-4, help="learning rate of the LoRA adapters")
    p.add_argument("--lora_rank", type=int, default=8, help="rank of each LoRA adapter")
    p.add_argument("--out", default="checkpoints/recovery_modes", help="where the two exports go")
    a = p.parse_args(argv)
    if not (ROOT / a.pruned / "masks.safetensors").is_file():
        _run("prune", "--output", a.pruned, "--method", a.method, "--sparsity", str(a.sparsity))
    base = ["fit", "--config", "configs/smollm2.yaml", "--config", "configs/recovery.yaml"]
    common = [f"--model.init_args.model_name={a.pruned}", f"--trainer.max_steps={a.steps}"]
    common += [f"--trainer.val_check_interval={a.steps}"]
    runs = {
        "full": [f"--model.init_args.lr={a.lr}"],
        "lora": ["--model.init_args.mode=lora", f"--model.init_args.lr={a.lora_lr}"]
        + [f"--model.init_args.lora_rank={a.lora_rank}", f"--model.init_args.lora_alpha={2 * a.lora_rank}"],
    }
    for mode, extra in runs.items():
        _run(*base, *common, *extra, f"--model.init_args.export_dir={a.out}/{mode}")
    report = (
        ROOT / a.pruned / "prune_report.json"
    )  # prune's eval: the same 64 x 128 tokens as recovery.yaml's
    before = json.loads(report.read_text())["perplexity"]["after"] if report.is_file() else None
    print(f"\npruned ({a.pruned}): perplexity {before}")
    for mode in runs:
        record = json.loads((ROOT / a.out / mode / "recovery.json").read_text())
        ppl, sparsity = record["metrics"].get("perplexity"), record["realised_sparsity"]
        pruned, leaked = _leaks(ROOT / a.pruned / "masks.safetensors", ROOT / a.out / mode)
        print(
            f"{mode:>4}: perplexity {ppl:.3f}, realised sparsity {sparsity:.4f}, {record['global_step']} steps, "
            f"{leaked} of {pruned:,} pruned weights nonzero in the export"
        )
    return 0


def _leaks(masks_file: Path, export: Path) -> tuple[int, int]:
    """(pruned positions, nonzero weights among them) of an exported model, read back from disk."""
    from transformers import AutoModelForCausalLM

    from lit_prune.pruning import load_masks, sparsity_report

    report = sparsity_report(AutoModelForCausalLM.from_pretrained(export), load_masks(masks_file))
    return sum(row["pruned"] for row in report), sum(row["leaked"] for row in report)


if __name__ == "__main__":
    sys.exit(main())
