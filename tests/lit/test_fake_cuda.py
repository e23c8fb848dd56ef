"""The project on an emulated CUDA device (tests/fake_cuda.py): cpu / cuda mixing fails CI, which has no GPU.

First the emulator itself (planted device bugs raise, legal patterns do not, nothing is left behind), then
the fast TopK step, Lightning fits with pruning and the RQ2 / RQ3 / RQ5 callbacks (bf16 LM), and the
tiny study, all with `accelerator=gpu`.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import math
import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from fake_cuda import DeviceMismatch, fake_cuda
from helpers import ROOT, tiny_prune_options
from torch.overrides import _get_current_function_mode_stack

pytestmark = pytest.mark.e2e  # Lightning fits and a study on the emulated device: the end-to-end lane


# --- the emulator: planted bugs raise, legal patterns pass ---------------------------------------
def _cuda_ones(*shape: int) -> torch.Tensor:
    return torch.ones(*shape, device="cuda")


class _ScaleBy(torch.autograd.Function):
    """x * w with a custom backward; subclasses plant device bugs in it."""

    @staticmethod
    def forward(ctx, x, w):  # noqa: ANN001, ANN205
        out = x * w
        ctx.save_for_backward(w, out)  # a saved output comes back in backward as a new tensor object
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        w, out = ctx.saved_tensors
        return grad * w, (grad * out / w).sum(0)


class _CpuTermInBackward(_ScaleBy):
    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        w, _ = ctx.saved_tensors
        return grad * w, (grad * torch.ones(grad.shape)).sum(0)  # a CPU tensor in a CUDA backward


class _CpuGradReturned(_ScaleBy):
    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad.cpu(), None


def _custom_backward(function: type[torch.autograd.Function]) -> torch.Tensor:
    w = torch.randn(3, device="cuda", requires_grad=True)
    x = torch.randn(2, 3, device="cuda", requires_grad=True)
    function.apply(x * 2, w).pow(2).sum().backward()
    return w.grad


def _index_put_cpu_values() -> None:
    _cuda_ones(4, 5)[torch.tensor([0, 1])] = torch.zeros(2, 5)


PLANTED = {
    "cpu @ cuda matmul": lambda: _cuda_ones(4, 5) @ torch.ones(5, 3),
    "cpu tensor indexed by cuda indices": lambda: torch.arange(4.0)[torch.tensor([0, 2], device="cuda")],
    ".numpy() of a cuda tensor": lambda: _cuda_ones(3).numpy(),
    "np.asarray of a cuda tensor": lambda: np.asarray(_cuda_ones(3)),
    "cpu generator for a cuda randn": lambda: torch.randn(
        3, device="cuda", generator=torch.Generator().manual_seed(0)
    ),
    "cuda 0-dim tensor with a cpu tensor": lambda: torch.ones(3) * torch.tensor(2.0, device="cuda"),
    "cpu input to a cuda module": lambda: torch.nn.Linear(5, 3).cuda()(torch.ones(2, 5)),
    "cat across devices": lambda: torch.cat([_cuda_ones(2), torch.ones(2)]),
    "cpu values assigned at cuda indices": _index_put_cpu_values,
    "cpu tensor in a custom backward": lambda: _custom_backward(_CpuTermInBackward),
    "custom backward returns a cpu grad": lambda: _custom_backward(_CpuGradReturned),
}


@pytest.mark.parametrize("name", PLANTED)
def test_planted_device_bug_raises(name):
    with fake_cuda(), pytest.raises(DeviceMismatch):
        PLANTED[name]()


def _copy_into_cpu() -> torch.Tensor:
    return torch.zeros(3).copy_(_cuda_ones(3))


def _slice_assign_cpu_values() -> torch.Tensor:
    x = torch.zeros(4, 5, device="cuda")
    x[:2] = torch.ones(2, 5)  # basic indexing copies: any device
    return x


LEGAL = {  # name: (call, device type of the result)
    "0-dim cpu scalar with a cuda tensor": (lambda: _cuda_ones(3) * torch.tensor(2.0), "cuda"),
    "cuda tensor indexed by cpu indices": (
        lambda: torch.arange(4.0, device="cuda")[torch.tensor([0, 2])],
        "cuda",
    ),
    "cuda tensor indexed by a cuda mask": (
        lambda: torch.arange(4.0).cuda()[torch.arange(4).cuda() > 1],
        "cuda",
    ),
    "cpu generator, then .to(cuda)": (
        lambda: torch.randperm(4, generator=torch.Generator().manual_seed(0)).to("cuda"),
        "cuda",
    ),
    "copy_ from cuda keeps the cpu destination": (_copy_into_cpu, "cpu"),
    "slice assignment of cpu values": (_slice_assign_cpu_values, "cuda"),
    "factory on a cuda tensor's device": (
        lambda: torch.zeros(3, device=_cuda_ones(1).device) + _cuda_ones(3),
        "cuda",
    ),
    "correct custom backward": (lambda: _custom_backward(_ScaleBy), "cuda"),
}


@pytest.mark.parametrize("name", LEGAL)
def test_legal_pattern_passes(name):
    call, device = LEGAL[name]
    with fake_cuda():
        assert call().device.type == device


def test_cpu_numpy_and_moves_copy_as_on_a_gpu():
    with fake_cuda():
        x = torch.ones(3)
        y = x.to("cuda")
        y.add_(1)  # a real move copies: x is untouched (on CPU, x.to("cpu") would alias)
        assert (x.device.type, y.device.type, y.is_cuda) == ("cpu", "cuda", True)
        assert x.tolist() == [1.0, 1.0, 1.0] and y.cpu().numpy().tolist() == [2.0, 2.0, 2.0]
        assert y.to("cuda") is y and y.to(x).device.type == "cpu" and x.type_as(y).device.type == "cuda"
        assert torch.zeros(2).to(torch.float64).device.type == "cpu"


@pytest.mark.parametrize("move", ["positional", "keyword", "cuda()"])
def test_module_moves_and_trains_on_the_device(move):
    with fake_cuda():
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4))
        model.register_buffer("scale", torch.tensor([2.0]))
        {
            "positional": lambda: model.to("cuda"),
            "keyword": lambda: model.to(device="cuda", dtype=torch.float32),
            "cuda()": model.cuda,
        }[move]()
        opt = torch.optim.Adam(model.parameters(), fused=True)
        (model(_cuda_ones(2, 5)) * model.scale).sum().backward()
        opt.step()
        tensors = [
            *model.parameters(),
            *model.buffers(),
            *(p.grad for p in model.parameters()),
            *(v for state in opt.state.values() for v in state.values()),
        ]
        assert {t.device.type for t in tensors} == {"cuda"}
        clone = copy.deepcopy(model)
        assert {p.device.type for p in clone.parameters()} == {"cuda"}
        with pytest.raises(DeviceMismatch):
            clone(torch.ones(2, 5))
        assert {p.device.type for p in model.cpu().parameters()} == {"cpu"}
        model(torch.ones(2, 5))


def _bool_mask() -> torch.Tensor:
    x = torch.arange(4.0, device="cuda")
    return x[x > 1]


WAITS = {  # name: (call, the wait it records): what makes the host wait for a real GPU
    "item": (lambda: _cuda_ones(1).item(), "TensorBase.item"),
    "float()": (lambda: float(_cuda_ones(1)), "TensorBase.__float__"),
    "if tensor": (lambda: 1 if _cuda_ones(2).any() else 0, "TensorBase.__bool__"),
    "boolean mask": (_bool_mask, "TensorBase.__getitem__ with a boolean mask"),
    "nonzero": (lambda: _cuda_ones(3).nonzero(), "TensorBase.nonzero"),
    "bincount": (
        lambda: torch.bincount(torch.zeros(3, dtype=torch.long, device="cuda")),
        "_VariableFunctionsClass.bincount",
    ),
    "cpu indices into cuda": (
        lambda: _cuda_ones(4)[torch.tensor([0, 2])],
        "TensorBase.__getitem__ with CPU indices",
    ),
    "blocking copy to cuda": (lambda: torch.ones(3).to("cuda"), "TensorBase.to to cuda:0"),
    "copy to the host": (lambda: _cuda_ones(3).cpu(), "TensorBase.cpu"),
    "tensor from data on cuda": (
        lambda: torch.tensor([1.0], device="cuda"),
        "_VariableFunctionsClass.tensor(device=cuda)",
    ),
    "new_tensor on cuda": (lambda: _cuda_ones(1).new_tensor(0.0), "TensorBase.new_tensor"),
}
NO_WAITS = {
    "pinned non-blocking copy": lambda: torch.ones(3).pin_memory().to("cuda", non_blocking=True),
    "sort, searchsorted, topk": lambda: torch.searchsorted(
        _cuda_ones(4).sort().values, _cuda_ones(2).topk(1).values
    ),
    "masked_fill_ and scatter_reduce_": lambda: (
        _cuda_ones(3)
        .masked_fill_(_cuda_ones(3) > 0, 0)
        .scatter_reduce_(0, torch.zeros(3, dtype=torch.long, device="cuda"), _cuda_ones(3), "amax")
    ),
    "new_zeros(())": lambda: _cuda_ones(1).new_zeros(()),
    "host-only work": lambda: torch.ones(3)[torch.ones(3) > 0].nonzero().tolist(),
}


@pytest.mark.parametrize("name", WAITS)
def test_host_waits_are_recorded(name):
    call, wait = WAITS[name]
    with fake_cuda() as mode:
        call()
    assert mode.host_waits == [wait]


@pytest.mark.parametrize("name", NO_WAITS)
def test_device_side_work_records_no_wait(name):
    with fake_cuda() as mode:
        NO_WAITS[name]()
    assert mode.host_waits == []


@pytest.fixture()
def deterministic_flags(monkeypatch):
    """Restores what Lightning's `deterministic=True` changes for the whole process."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


REFUSED_WHEN_DETERMINISTIC = {
    "float cumsum": lambda: _cuda_ones(3).cumsum(0),
    "bincount with weights": lambda: torch.bincount(
        torch.zeros(3, dtype=torch.long, device="cuda"), _cuda_ones(3)
    ),
    "scatter_reduce prod": lambda: _cuda_ones(3).scatter_reduce(
        0, torch.zeros(3, dtype=torch.long, device="cuda"), _cuda_ones(3), "prod"
    ),
    "cross_entropy": lambda: torch.nn.functional.cross_entropy(
        _cuda_ones(2, 3), torch.zeros(2, dtype=torch.long, device="cuda")
    ),
}


@pytest.mark.parametrize("name", REFUSED_WHEN_DETERMINISTIC)
def test_deterministic_mode_refuses_what_cuda_refuses(name, deterministic_flags):
    from fake_cuda import NondeterministicOnCuda

    with fake_cuda():
        REFUSED_WHEN_DETERMINISTIC[name]()  # fine by default
        torch.use_deterministic_algorithms(True)
        with pytest.raises(NondeterministicOnCuda):
            REFUSED_WHEN_DETERMINISTIC[name]()
        torch.ones(3).cumsum(0)  # CPU tensors: no refusal
        _cuda_ones(3).long().cumsum(0)  # integer cumsum has a deterministic kernel


def test_everything_is_restored_on_exit_even_after_an_error():
    before = (
        torch.cuda.is_available(),
        torch.cuda.device_count(),
        torch.nn.Parameter.__new__,
        torch.autograd.Function.apply,
        os.environ.get("CUDA_DEVICE_ORDER"),
    )
    with pytest.raises(DeviceMismatch), fake_cuda():
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # as Lightning's CUDA accelerator does
        leftover = _cuda_ones(3)
        leftover @ torch.ones(3, 2)
    after = (
        torch.cuda.is_available(),
        torch.cuda.device_count(),
        torch.nn.Parameter.__new__,
        torch.autograd.Function.apply,
        os.environ.get("CUDA_DEVICE_ORDER"),
    )
    assert after == before
    assert _get_current_function_mode_stack() == []
    assert "saved_tensors" not in torch.autograd.function.BackwardCFunction.__dict__
    assert leftover.device.type == "cpu" and (leftover @ torch.ones(3, 2)).shape == (2,)  # marks are inert


# --- the fast TopK step ----------------------------------------------------------------------
@pytest.mark.parametrize("dense_threshold", [0.0, math.inf], ids=["dense-layout", "sparse-layout"])
def test_fast_topk_step_on_the_device_equals_cpu(dense_threshold):
    from lit_prune.sae.build import SAESettings, build_training_sae
    from lit_prune.sae.fast import fast_topk_training_forward

    sae = build_training_sae(SAESettings(expansion=4, k=8), 64, seed=0)
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    dead = torch.arange(sae.cfg.d_sae) % 3 == 0  # a third of the latents get the auxiliary loss

    def step(model, x, dead):
        out = fast_topk_training_forward(model, x, dead, dense_threshold=dense_threshold)
        out.loss.backward()
        return out, {name: p.grad for name, p in model.named_parameters()}

    want, want_grads = step(copy.deepcopy(sae), x, dead)
    with fake_cuda():
        got, grads = step(copy.deepcopy(sae).cuda(), x.cuda(), dead.cuda())
        devices = {
            t.device.type
            for t in [got.loss, got.sae_out, got.fired, got.l0, *got.losses.values(), *grads.values()]
        }
    assert devices == {"cuda"}
    assert want.losses["auxiliary_reconstruction_loss"] > 0
    torch.testing.assert_close(got.loss, want.loss)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


# --- Lightning fits with accelerator=gpu ------------------------------------------------------
class DeviceProbe(L.Callback):
    """Records the device (and LM dtype) of everything a fit touches while it trains and validates."""

    def __init__(self) -> None:
        self.devices: dict[str, set[str]] = {}
        self.lm_dtypes: set[torch.dtype] = set()

    def _see(self, what: str, tensors) -> None:
        self.devices.setdefault(what, set()).update(t.device.type for t in tensors)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._see("batch", [batch["input_ids"]])
        self._see("sae", module.sae.parameters())
        self._see("module buffers", module.buffers())
        self._see("lm", module.lm.parameters())
        self.lm_dtypes.update(p.dtype for p in module.lm.parameters())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._see("grads", [p.grad for p in module.sae.parameters() if p.grad is not None])
        self._see(
            "optimizer state", [v for s in module.optimizers().optimizer.state.values() for v in s.values()]
        )
        if module.buffer.storage is not None:
            self._see("activation buffer", [module.buffer.storage])

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self._see("val batch", [batch["input_ids"]])
        self._see("val lm", module.lm.parameters())


@pytest.fixture()
def step_spy(monkeypatch):
    """Every fast TopK step of the fits: (input device, loss device, any dead latent, auxiliary loss)."""
    import lit_prune.lit.sae_module as sae_module

    steps: list[tuple[str, str, bool, float]] = []
    real = sae_module.fast_topk_training_forward

    def spy(sae, x, dead=None, **kwargs):
        out = real(sae, x, dead, **kwargs)
        aux = float(out.losses["auxiliary_reconstruction_loss"].detach())
        steps.append((x.device.type, out.loss.device.type, bool(dead is not None and dead.any()), aux))
        return out

    monkeypatch.setattr(sae_module, "fast_topk_training_forward", spy)
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything writes it; restored afterwards
    return steps


def _tiny_cli(tmp_path: Path, corpus: Path, model_cache: Path, name: str, *extra: str):
    """The tiny config's LightningCLI with accelerator=gpu, not run (call inside fake_cuda())."""
    from lit_prune.cli import lightning_cli

    return lightning_cli(
        [
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            f"--model.model_cache_dir={model_cache}",
            f"--data.corpus={corpus}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.train_tokens=2048",
            "--data.eval_tokens=512",
            "--model.ce_eval_sequences=4",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--model.export_dir={tmp_path / name}",
            "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=gpu",
            *extra,
        ],
        run=False,
    )


def _fit(tmp_path: Path, corpus: Path, model_cache: Path, name: str, *extra: str):
    """A tiny fit on the emulated GPU with a DeviceProbe: (cli, probe)."""
    cli = _tiny_cli(tmp_path, corpus, model_cache, name, *extra)
    probe = DeviceProbe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, probe


def _assert_on_cuda(probe: DeviceProbe) -> None:
    assert set(probe.devices) >= {
        "batch",
        "sae",
        "module buffers",
        "lm",
        "grads",
        "optimizer state",
        "val batch",
        "val lm",
    }
    assert {k: v for k, v in probe.devices.items() if v != {"cuda"}} == {}


def _finite(rows: list[dict], metric: str) -> list[float]:
    values = [r["value"] for r in rows if r["metric"] == metric]
    assert values and all(v is not None and math.isfinite(v) for v in values), (metric, values)
    return values


def test_dense_fit_then_wanda_fit_with_analysis_callbacks_bf16(tmp_path, local_corpus, model_cache, step_spy):
    with fake_cuda():
        dense, probe = _fit(tmp_path, local_corpus, model_cache, "dense", "--trainer.fast_dev_run=true")
        _assert_on_cuda(probe)
        assert probe.lm_dtypes == {torch.float32}
        callbacks = tmp_path / "callbacks.yaml"
        callbacks.write_text(
            "trainer:\n  callbacks+:\n"
            "    - class_path: lit_prune.lit.callbacks.PruningCallback\n"
            "      init_args: {method: wanda, sparsity: 0.5, perplexity_sequences: 2}\n"
            "    - class_path: lit_prune.lit.transfer_callback.TransferabilityCallback\n"
            f"      init_args: {{reference_sae: {tmp_path / 'dense'}, sae_prune_levels: [0.5],"
            " at_fit_end: true}\n"
            "    - class_path: lit_prune.lit.survival_callback.FeatureSurvivalCallback\n"
            f"      init_args: {{reference_sae: {tmp_path / 'dense'}, n_boot: 20, at_fit_end: true}}\n"
            "    - class_path: lit_prune.lit.ablation_callback.AblationCallback\n"
            "      init_args: {n_top: 4, n_random: 4, n_rare: 4, eval_sequences: 4}\n"
        )
        pruned, probe = _fit(
            tmp_path,
            local_corpus,
            model_cache,
            "pruned",
            "--config",
            str(callbacks),
            "--model.seed=1",
            "--data.shuffle_seed=1",
            "--model.lm_dtype=bfloat16",
            "--model.dead_window_tokens=0",
        )  # every latent silent in a step is dead: aux loss
        # at_fit_end measured on the device after Lightning's teardown, not by taking the LM to the CPU
        assert {p.device.type for p in pruned.model.lm.parameters()} == {"cuda"}
        assert {p.device.type for p in pruned.model.sae.parameters()} == {"cpu"}  # as Lightning left it
    _assert_on_cuda(probe)
    assert probe.devices["activation buffer"] == {"cuda"}  # (a one-batch fit clears it before the batch ends)
    assert probe.lm_dtypes == {torch.bfloat16}
    # the fast TopK path ran on the device, with dead latents and their auxiliary loss
    assert step_spy and {(x, loss) for x, loss, _, _ in step_spy} == {("cuda", "cuda")}
    assert any(dead and aux > 0 and math.isfinite(aux) for _, _, dead, aux in step_spy)
    for cli in (dense, pruned):
        assert cli.model.tokens_trained.item() > 0
        assert all(math.isfinite(v) for v in cli.model.last_val.values()), cli.model.last_val
    info = pruned.model.pruning_info
    assert info["realised_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert math.isfinite(info["perplexity_dense"]) and math.isfinite(info["perplexity_pruned"])
    results = Path(pruned.trainer.log_dir) / "results"
    read = lambda name: json.loads((results / name).read_text())  # noqa: E731
    rq2, rq3, rq5 = read("rq2_survival.json"), read("rq3_transfer.json"), read("rq5_ablation.json")
    assert {r["stage"] for r in rq2} == {"validation", "fit_end"}  # fit_end: after Lightning's teardown
    assert {r["stage"] for r in rq3} == {"dense", "validation", "fit_end"}
    _finite(rq2, "mean_cosine")
    _finite(rq3, "fvu")
    _finite(rq5, "attribution_mean")


def test_sae_steps_wait_for_the_device_only_to_count_dead_latents(
    tmp_path, local_corpus, model_cache, monkeypatch
):
    """A GPU runs ahead of the host only where the host does not wait for it. Over a fit, a buffer draw never
    waits; an SAE step waits once, for the number of dead latents (the auxiliary loss's shapes follow it),
    plus once per log_every_n_steps steps for the training scalars, and the first step once more."""
    import lit_prune.lit.sae_module as sae_module
    from lit_prune.sae.buffer import ActivationBuffer

    waits: dict[str, list[list[str]]] = {"pop": [], "sae_step": []}

    def recorded(owner, name):
        real = getattr(owner, name)

        def call(self, *args):
            before = len(mode.host_waits)
            out = real(self, *args)
            waits[name].append(mode.host_waits[before:])
            return out

        monkeypatch.setattr(owner, name, call)

    with fake_cuda() as mode:
        recorded(ActivationBuffer, "pop")
        recorded(sae_module.SAEModule, "sae_step")
        cli, probe = _fit(
            tmp_path,
            local_corpus,
            model_cache,
            "dense",
            "--model.sae_batch_tokens=64",
            "--model.dead_window_tokens=0",
            "--trainer.log_every_n_steps=4",
        )
    _assert_on_cuda(probe)
    steps = len(waits["sae_step"])
    assert steps == cli.model.global_step > 8
    assert waits["pop"] == [[]] * steps
    assert waits["sae_step"][0][0] == "TensorBase.item"  # tokens_trained, read once per fit
    counts = collections.Counter(w for step in waits["sae_step"] for w in step)
    assert counts == {"TensorBase.item": 1, "TensorBase.nonzero": steps, "TensorBase.tolist": steps // 4}


# --- the tiny study ---------------------------------------------------------------------------
def test_tiny_study_on_the_device(
    tmp_path, local_corpus, model_cache, step_spy, monkeypatch, deterministic_flags
):
    """The whole tiny study, in deterministic mode: no step uses an op that CUDA refuses then."""
    import lit_prune.study.steps as steps
    from lit_prune.commands.study import run_study

    seen: dict[str, set[str]] = {"perplexity": set(), "rq5": set()}
    for name, key in (("perplexity", "perplexity"), ("feature_importance", "rq5")):
        real = getattr(steps, name)

        def spy(lm, *args, _real=real, _key=key, **kwargs):
            seen[_key].add(next(lm.parameters()).device.type)  # where the step's LM runs
            return _real(lm, *args, **kwargs)

        monkeypatch.setattr(steps, name, spy)
    loggers = {name: logging.getLogger(name).level for name in ("lightning.pytorch", "lightning.fabric")}
    try:
        with warnings.catch_warnings(), fake_cuda():  # the study quiets Lightning's loggers and a warning
            root = run_study(
                [
                    "--config",
                    str(ROOT / "configs" / "tiny.yaml"),
                    f"--data.corpus={local_corpus}",
                    f"--data.cache_dir={tmp_path / 'cache'}",
                    f"--model.model_cache_dir={model_cache}",
                    f"--study.checkpoints={tmp_path / 'checkpoints'}",
                    f"--study.logs={tmp_path / 'logs'}",
                    "--progress=false",
                    "--report=false",
                    "--trainer.accelerator=gpu",
                    "--trainer.deterministic=true",
                ]
            )
    finally:
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)
    assert torch.are_deterministic_algorithms_enabled()  # the study's trainers asked for it
    assert seen == {"perplexity": {"cuda"}, "rq5": {"cuda"}}
    assert step_spy and {(x, loss) for x, loss, _, _ in step_spy} == {("cuda", "cuda")}
    run = json.loads((root / "runs.jsonl").read_text())
    assert run["skipped"] == [] and len(run["ran"]) == len(list(root.glob("*/*/done.json"))) > 0
    for cond in ("magnitude-0.5", "wanda-0.5"):
        ppl = json.loads((root / cond / "prune" / "results" / "perplexity.json").read_text())
        assert _finite(ppl, "realised_sparsity") == [pytest.approx(0.5, abs=1e-3)]
        _finite(ppl, "perplexity")
        _finite(
            json.loads((root / cond / "seed1" / "results" / "rq2_survival.json").read_text()), "mean_cosine"
        )
        _finite(json.loads((root / cond / "seed0" / "results" / "rq3_transfer.json").read_text()), "fvu")
    _finite(
        json.loads((root / "dense" / "rq5" / "results" / "rq5_ablation.json").read_text()), "attribution_mean"
    )


def test_validate_with_gradient_attribution_moves_the_lm_outside_inference_mode(
    tmp_path, local_corpus, model_cache
):
    """`validate` first moves the LM to the GPU inside Lightning's inference mode; a plain `.to` there
    would give inference-tensor weights that RQ5's gradient attribution cannot backpropagate through."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks+:\n    - class_path: lit_prune.lit.ablation_callback.AblationCallback\n"
        "      init_args: {n_top: 4, n_random: 4, n_rare: 4, eval_sequences: 4}\n"
    )
    with fake_cuda():
        cli = _tiny_cli(
            tmp_path, local_corpus, model_cache, "sae", "--config", str(callbacks), "--model.norm_scale=1.0"
        )
        cli.trainer.validate(cli.model, datamodule=cli.datamodule)
        assert {(p.device.type, p.is_inference()) for p in cli.model.lm.parameters()} == {("cuda", False)}
    rows = json.loads((Path(cli.trainer.log_dir) / "results" / "rq5_ablation.json").read_text())
    _finite(rows, "attribution_mean")


def test_prune_command_on_the_device(tmp_path, local_corpus, model_cache):
    from lit_prune.commands.prune import run_prune

    with fake_cuda():
        result = run_prune(
            tiny_prune_options(
                tmp_path / "out",
                local_corpus,
                model_cache,
                tmp_path / "cache",
                sparsity=0.5,
                eval_sequences=2,
                batch_size=2,
                device="cuda",
            )
        )
        assert {p.device.type for p in result.model.parameters()} == {"cuda"}
    report = result.report
    assert report["realised_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(math.isfinite(report["perplexity"][k]) for k in ("before", "after"))
    assert (tmp_path / "out" / "masks.safetensors").is_file()
