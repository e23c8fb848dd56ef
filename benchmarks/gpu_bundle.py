"""Pack what an offline GPU machine that already has PyTorch needs to run the GPU benchmarks.

Run here, with internet, after `make setup` and once the embedded model was converted (any run):
    python benchmarks/gpu_bundle.py [--python 3.12] [--present FILE] [--bundle .gpu_bundle]
It writes
- BUNDLE/wheels/: this environment's version of every dependency of lit_prune (recursively) that FILE
  does not name, as wheels for the target Python on x86-64 Linux. torch and its CUDA libraries are
  never packed: the GPU machine's own are used;
- BUNDLE/smollm2-135m/: SmolLM2-135M's config and tokenizer, without weights
  (benchmarks/random_model.py gives it random ones there).
Then, on the GPU machine, from the repository root: `bash benchmarks/gpu_run.sh BUNDLE`.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from random_model import TOKENIZER_FILES

ROOT = Path(__file__).resolve().parents[1]
NEVER = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")  # the GPU machine's own build
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
MODEL_FILES = ("config.json", *TOKENIZER_FILES)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependencies(root: str, python: str, present: set[str]) -> dict[str, str]:
    """{distribution name: installed version} of root's dependencies that are to be packed."""
    env = {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
    }
    packed: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    while todo:
        name, extras = todo.pop()
        if (normalise(name), extras) in seen:
            continue
        seen.add((normalise(name), extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a dependency of a platform or extra this environment does not use
        if name != root:
            packed[dist.metadata["Name"]] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in {"", *extras}):
                continue
            if normalise(req.name) in present or NEVER.match(normalise(req.name)):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return packed


def download(name: str, version: str, python: str, wheels: Path) -> bool:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(wheels),
        f"{name}=={version}",
    ]
    return subprocess.run(cmd, capture_output=True, text=True).returncode == 0


def read_present(path: Path | None) -> set[str]:
    """Names in FILE, separated by commas, spaces or new lines."""
    return set() if path is None else {normalise(n) for n in re.split(r"[,\s]+", path.read_text()) if n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default="3.12", help="the GPU machine's Python version (major.minor)")
    p.add_argument("--present", type=Path, help="file naming the packages the GPU machine already has")
    p.add_argument("--bundle", type=Path, default=ROOT / ".gpu_bundle", help="folder to write")
    p.add_argument(
        "--model_cache_dir",
        type=Path,
        default=ROOT / "checkpoints" / "models",
        help="where the converted SmolLM2 is",
    )
    args = p.parse_args()
    source = args.model_cache_dir / "smollm2-135m"
    if not (source / "config.json").is_file():
        raise SystemExit(
            f"model_cache_dir={str(args.model_cache_dir)!r}: no converted smollm2-135m there; "
            "run `python -m lit_prune fit --config configs/smollm2.yaml --trainer.fast_dev_run=true` first"
        )
    wheels = args.bundle / "wheels"
    shutil.rmtree(args.bundle, ignore_errors=True)
    wheels.mkdir(parents=True)
    missing = [
        f"{n}=={v}"
        for n, v in sorted(dependencies("lit_prune", args.python, read_present(args.present)).items())
        if not download(n, v, args.python, wheels)
    ]
    (args.bundle / "smollm2-135m").mkdir()
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, args.bundle / "smollm2-135m" / name)
    size = sum(f.stat().st_size for f in args.bundle.rglob("*") if f.is_file())
    print(f"{args.bundle}: {len(list(wheels.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in all")
    if missing:  # sdist-only packages; fine when nothing imports them at run time
        print("no wheel for: " + ", ".join(missing))


if __name__ == "__main__":
    main()
