"""An emulated CUDA device for CPU-only CI: catches cpu / cuda device mixing without a GPU.

`with fake_cuda(): ...` makes the code inside believe one CUDA device exists. A tensor "on cuda" is an
ordinary CPU tensor carrying the Python attribute `_fc = True`. A `torch.overrides.TorchFunctionMode`
sees every torch call made from Python, reports such tensors' `.device` as cuda:0, marks the outputs
of ops on them, and raises `DeviceMismatch` where CUDA would refuse the call:

- an op whose tensor arguments are on both devices (0-dim CPU tensors, i.e. scalars, are allowed);
- indexing a CPU tensor with CUDA index tensors (a CUDA tensor with CPU indices is fine), and an
  advanced-index assignment of non-scalar values from the other device;
- a CPU `torch.Generator` for a CUDA output (`torch.randn(..., device="cuda", generator=g)`);
- `.numpy()` / `np.asarray` of a CUDA tensor (`.cpu().numpy()` is fine);
- a custom `torch.autograd.Function` whose backward mixes devices or returns a gradient on another
  device than its input. The mode does not see what runs inside the autograd engine, so custom
  backwards are re-entered under it, their incoming gradients marked like the forward's outputs.

With `torch.use_deterministic_algorithms(True)` (Lightning's `deterministic=True`) it raises
`NondeterministicOnCuda` for the CUDA ops that torch's documentation says raise then (float cumsum,
bincount with weights, histc, median with indices, scatter_reduce "prod", put_, NLL / cross-entropy).

`mode.host_waits` lists the calls that would make the host wait for a real GPU (a stream sync): reading
a value (`item`, `bool`, `tolist`), ops whose output size depends on the data (`nonzero`, boolean masks,
`bincount`, `unique`), copies to the host, and blocking copies to the device (non-blocking ones from
pinned memory do not wait).

Moves (`.to`, `.cuda`, `.cpu`, `copy_`, `Module.to`) cross devices freely and copy, as on a GPU (on CPU,
`x.to("cpu")` returns x itself; code relying on that aliasing behaves here as on a GPU). Lightning
takes `accelerator="gpu"`: `torch.cuda.is_available`, `device_count`, `set_device` and the device name
and capability are patched while the block runs, and `nn.Parameter` keeps its data's device; all is
restored on exit (marks left on tensors are inert without the mode).

What it cannot check: that CUDA has a kernel for an op and dtype (sparse CSR, bf16), speed, memory,
numerics (every op still runs on CPU kernels), device mixing inside torch's own C++ code and backward
formulas, `torch.ops.*` calls (below the mode: their outputs stay unmarked), Python tensor hooks run
by the autograd engine, and other threads than the caller's. `torch.save` writes emulated CUDA tensors
as CPU ones (a checkpoint reloads onto CPU). Code that needs real CUDA memory or runtime (CUDA
generators, streams, autocast / mixed precision, memory statistics, `torch.load(map_location="cuda")`,
`torch.set_default_device("cuda")`) fails on a CPU build instead of passing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import BackwardCFunction, Function, FunctionCtx
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


class DeviceMismatch(RuntimeError):
    """A call that real CUDA would reject for mixing devices."""


class NondeterministicOnCuda(RuntimeError):
    """A call that real CUDA would reject in deterministic mode (it has no deterministic kernel)."""


def is_cuda(t: object) -> bool:
    """Whether t is a tensor on the emulated CUDA device."""
    return isinstance(t, torch.Tensor) and getattr(t, "_fc", False)


def _mark(t: Any, on_cuda: bool) -> Any:
    if isinstance(t, torch.Tensor):
        t._fc = on_cuda
    return t


def _names_cuda(device: object) -> bool | None:
    """True for a CUDA device argument ("cuda", cuda:0, an int index), False for CPU, None otherwise."""
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        return {"cuda": True, "cpu": False}.get(device.type)
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    return None


def _on(t: torch.Tensor, on_cuda: bool) -> torch.Tensor:
    """t on the given device: itself if already there, else a marked copy (as a real move)."""
    return t if is_cuda(t) == on_cuda else _mark(t.clone(), on_cuda)


def _fail(message: str) -> None:
    raise DeviceMismatch(f"{message} [fake_cuda]")


def _where(on_cuda: bool) -> str:
    return "cuda:0" if on_cuda else "cpu"


def _name(func: Callable) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))


def _check_same_device(func: Callable, tensors: list[torch.Tensor]) -> None:
    """CUDA's rule for one op: all tensors on one device, except 0-dim CPU tensors."""
    if len({is_cuda(t) for t in tensors if is_cuda(t) or t.dim() > 0}) > 1:
        shapes = [(_where(is_cuda(t)), tuple(t.shape)) for t in tensors]
        _fail(
            f"{_name(func)}: expected all tensors to be on the same device, but found cuda:0 and cpu: "
            f"{shapes}"
        )


def _check_indices(self: torch.Tensor, index: object, values: object = None) -> None:
    """Advanced indexing: indices on CPU or self's device; assigned values on self's device or 0-dim."""
    indices = [t for t in tree_flatten(index)[0] if isinstance(t, torch.Tensor)]
    advanced = [t for t in indices if t.dim() > 0 or t.dtype == torch.bool]  # 0-dim integers act as ints
    if not is_cuda(self) and any(is_cuda(t) for t in advanced):
        _fail(f"indexing a CPU tensor {tuple(self.shape)} with CUDA indices")
    if (
        advanced
        and isinstance(values, torch.Tensor)
        and values.dim() > 0
        and is_cuda(values) != is_cuda(self)
    ):
        _fail(f"index_put into a {_where(is_cuda(self))} tensor of values on {_where(is_cuda(values))}")


def _getitem(func: Callable, args: tuple, kwargs: dict) -> Any:
    _check_indices(args[0], args[1])
    out = func(*args, **kwargs)
    return out if out is args[0] else _mark(out, is_cuda(args[0]))


def _setitem(func: Callable, args: tuple, kwargs: dict) -> Any:
    _check_indices(args[0], args[1], args[2])  # basic indexing copies: any device (copy_)
    return func(*args, **kwargs)


def _index_put(func: Callable, args: tuple, kwargs: dict) -> Any:
    values = args[2] if len(args) > 2 else kwargs.get("values")
    _check_indices(args[0], args[1], values)
    out = func(*args, **kwargs)
    return out if out is args[0] else _mark(out, is_cuda(args[0]))


def _to_numpy(func: Callable, args: tuple, kwargs: dict) -> Any:
    if is_cuda(args[0]) and not kwargs.get("force"):
        _fail("can't convert a cuda:0 tensor to numpy: use .cpu() first")
    return func(*args, **kwargs)


def _to_target(args: tuple, kwargs: dict) -> tuple[bool | None, list, dict]:
    """Tensor.to's target (True: cuda, False: cpu, None: stays) and its arguments with CPU as the device."""
    rest, target = list(args[1:]), None
    for i, a in enumerate(rest):
        if isinstance(a, torch.Tensor):  # to(other): other's dtype and device
            target, rest[i] = is_cuda(a), a.dtype
        elif _names_cuda(a) is not None:
            target, rest[i] = _names_cuda(a), CPU
    if _names_cuda(kwargs.get("device")) is not None:
        target, kwargs = _names_cuda(kwargs["device"]), {**kwargs, "device": CPU}
    return target, rest, kwargs


def _to(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """Tensor.to(device / dtype / other tensor, ...): the target device is emulated, the rest is torch's."""
    t = args[0]
    target, rest, kwargs = _to_target(args, kwargs)
    out = func(t, *rest, **kwargs)
    if target is None or target == is_cuda(t):
        return out if out is t else _mark(out, is_cuda(t))
    return _mark(out.clone() if out is t else out, target)


def _type_as(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    return _on(func(*args, **kwargs), is_cuda(args[1]))


def _set_data(func: Callable, args: tuple, kwargs: dict) -> Any:
    """`t.data = x` / `t.set_(x)` give t x's device (Module.to moves parameters this way)."""
    out = func(*args, **kwargs)
    if len(args) > 1 and isinstance(args[1], torch.Tensor):
        _mark(args[0], is_cuda(args[1]))
    return out


def _set_grad(func: Callable, args: tuple, kwargs: dict) -> Any:
    grad = args[1]
    if isinstance(grad, torch.Tensor) and is_cuda(grad) != is_cuda(args[0]):
        _fail(f"assigned grad on {_where(is_cuda(grad))} to a tensor on {_where(is_cuda(args[0]))}")
    return func(*args, **kwargs)


def _generic(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Every other op: check devices, run on CPU, mark new outputs as cuda where CUDA would put them."""
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    _check_same_device(func, tensors)
    wanted = _names_cuda(kwargs.get("device"))
    if wanted:
        kwargs = {**kwargs, "device": CPU}
    if kwargs.get("pin_memory"):  # page-locked staging buffers (safetensors loading to cuda) need a GPU
        kwargs = {**kwargs, "pin_memory": False}
    on_cuda = wanted if wanted is not None else any(is_cuda(t) for t in tensors)
    generator = kwargs.get("generator")
    if on_cuda and isinstance(generator, torch.Generator) and generator.device.type != "cuda":
        _fail(f"{_name(func)}: expected a 'cuda' device type for generator but found 'cpu'")
    out = func(*args, **kwargs)
    inputs = {id(t) for t in tensors}  # in-place ops return an input: its device never changes
    if wanted is not None and id(out) in inputs and is_cuda(out) != wanted:
        out = out.clone()  # as_tensor(x, device=...) moving x: a copy, as on a GPU
    if on_cuda:
        tree_map(lambda x: _mark(x, True) if isinstance(x, torch.Tensor) and id(x) not in inputs else x, out)
    return out


_HANDLERS: dict[Callable, Callable[[Callable, tuple, dict], Any]] = {
    torch.Tensor.device.__get__: lambda f, a, k: CUDA if is_cuda(a[0]) else f(*a, **k),
    torch.Tensor.is_cuda.__get__: lambda f, a, k: is_cuda(a[0]),
    torch.Tensor.is_cpu.__get__: lambda f, a, k: not is_cuda(a[0]) and f(*a, **k),
    torch.Tensor.get_device: lambda f, a, k: 0 if is_cuda(a[0]) else f(*a, **k),
    torch.Tensor.cuda: lambda f, a, k: _on(a[0], True),
    torch.Tensor.cpu: lambda f, a, k: _on(a[0], False),
    torch.Tensor.to: _to,
    torch.Tensor.copy_: lambda f, a, k: f(*a, **k),  # any device to any device; the destination keeps its own
    torch._has_compatible_shallow_copy_type: lambda f, a, k: f(
        *a, **k
    ),  # Module._apply asks before `.data =`
    torch._C._nn._parse_to: lambda f, a, k: f(*a, **k),  # Module.to(device="cuda") parses its arguments
    torch.Tensor.type_as: _type_as,
    torch.Tensor.data.__set__: _set_data,
    torch.Tensor.set_: _set_data,
    torch.Tensor.grad.__set__: _set_grad,
    torch.Tensor.__getitem__: _getitem,
    torch.Tensor.__setitem__: _setitem,
    torch.Tensor.index_put_: _index_put,
    torch.Tensor.index_put: _index_put,
    torch.Tensor.pin_memory: lambda f, a, k: _mark(a[0].clone(), False),  # a page-locked host copy
    torch.Tensor.numpy: _to_numpy,
    torch.Tensor.__array__: _to_numpy,
}


# --- host waits ---------------------------------------------------------------------------------
T = torch.Tensor
_WAIT_ON_CUDA_INPUT = {  # the host needs a value (or an output size) computed on the device
    T.item,
    T.tolist,
    T.__bool__,
    T.__float__,
    T.__int__,
    T.__index__,
    T.__format__,
    T.nonzero,
    torch.nonzero,
    T.argwhere,
    torch.argwhere,
    T.masked_select,
    torch.masked_select,
    T.unique,
    torch.unique,
    T.unique_consecutive,
    torch.unique_consecutive,
    T.bincount,
    torch.bincount,
    T.equal,
    torch.equal,
    T.allclose,
    torch.allclose,
}
_INDEXING = {T.__getitem__, T.__setitem__, T.index_put_, T.index_put}
_FROM_DATA = {torch.tensor, torch.as_tensor}  # torch.tensor(data, device="cuda"): a blocking copy


def _host_wait(func: Callable, args: tuple, kwargs: dict) -> str | None:
    """Why, on a real GPU, this call would make the host wait for the device (a stream sync), or None.

    Non-blocking host-to-device copies count as no wait: true for pinned sources, which is how the
    project makes them (a pageable source may still be staged synchronously by the driver).
    """
    name, non_blocking = _name(func), bool(kwargs.get("non_blocking"))
    if (
        func in _WAIT_ON_CUDA_INPUT
        or (func is torch.where and len(args) == 1)
        or (
            func in (T.repeat_interleave, torch.repeat_interleave)
            and kwargs.get("output_size") is None
            and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor)
        )
    ):
        return name if any(is_cuda(t) for t in tree_flatten((args, kwargs))[0]) else None
    if func in _INDEXING and is_cuda(args[0]):
        index = [t for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        values = args[2] if len(args) > 2 else kwargs.get("values")
        if any(t.dtype == torch.bool for t in index):
            return f"{name} with a boolean mask"
        if any(not is_cuda(t) for t in index):
            return f"{name} with CPU indices"
        if isinstance(values, torch.Tensor) and values.dim() > 0 and not is_cuda(values):
            return f"{name} of CPU values"
        return None
    if func is T.to:
        target = _to_target(args, kwargs)[0]
        source, non_blocking = is_cuda(args[0]), non_blocking or (len(args) > 2 and args[2] is True)
        moved = target is not None and target != source
        return f"{name} to {_where(target)}" if moved and (source or not non_blocking) else None
    if func is T.cpu:
        return name if is_cuda(args[0]) else None
    if func is T.cuda:
        return name if not is_cuda(args[0]) and not non_blocking else None
    if func is T.copy_:
        non_blocking = non_blocking or (len(args) > 2 and bool(args[2]))
        crossing = is_cuda(args[0]) != is_cuda(args[1])
        return name if crossing and (is_cuda(args[1]) or not non_blocking) else None
    if func in _FROM_DATA and _names_cuda(kwargs.get("device")) and not is_cuda(args[0]):
        return f"{name}(device=cuda)"
    if func is T.new_tensor and is_cuda(args[0]) and not is_cuda(args[1]):
        return name
    return None


# --- deterministic mode -------------------------------------------------------------------------
def _refused_when_deterministic(func: Callable, args: tuple, kwargs: dict) -> str | None:
    """Why CUDA would raise for this call under `torch.use_deterministic_algorithms(True)` (Lightning's
    `deterministic=True`), or None: the ops of that function's list that the mode sees, for torch 2.13."""
    if (
        not torch.are_deterministic_algorithms_enabled()
        or torch.is_deterministic_algorithms_warn_only_enabled()
    ):
        return None
    if not any(is_cuda(t) for t in tree_flatten((args, kwargs))[0]):
        return None
    arg = lambda i, key: args[i] if len(args) > i else kwargs.get(key)  # noqa: E731
    if func in (torch.cumsum, T.cumsum, T.cumsum_):
        dtype = kwargs.get("dtype") or args[0].dtype
        return "cumsum of a floating-point tensor" if dtype.is_floating_point or dtype.is_complex else None
    if func in (torch.bincount, T.bincount) and arg(1, "weights") is not None:
        return "bincount with weights"
    if func in (torch.median, T.median) and arg(1, "dim") is not None:
        return "median with indices"
    if func in (torch.scatter_reduce, T.scatter_reduce, T.scatter_reduce_) and arg(4, "reduce") == "prod":
        return "scatter_reduce with reduce='prod'"
    if func in (torch.histc, T.histc, T.put_, T.put, F.nll_loss, F.cross_entropy):
        return _name(func)
    return None


class FakeCudaMode(TorchFunctionMode):
    """The TorchFunctionMode behind `fake_cuda()` (use that: it also patches torch.cuda and autograd).

    `host_waits` lists, in order, every call seen that would make the host wait for a real GPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.host_waits: list[str] = []

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if (refused := _refused_when_deterministic(func, args, kwargs)) is not None:
            raise NondeterministicOnCuda(
                f"{refused} does not have a deterministic implementation on CUDA, "
                "but use_deterministic_algorithms(True) is set [fake_cuda]"
            )
        if (why := _host_wait(func, args, kwargs)) is not None:
            self.host_waits.append(why)
        return _HANDLERS.get(func, _generic)(func, args, kwargs)


# --- custom autograd Functions -------------------------------------------------------------------
# Their backward runs inside the autograd engine (under Tensor.backward, which the mode handles as one
# call), so it is re-entered under the mode here: the incoming gradients are marked like the forward
# outputs, saved tensors like they were when saved, and the returned gradients are checked.
def _tags(values: tuple) -> list[bool | None]:
    return [is_cuda(v) if isinstance(v, torch.Tensor) else None for v in values]


def _patched_autograd(mode: FakeCudaMode) -> dict[tuple[type, str], object]:
    """Replacements for Function.apply, FunctionCtx.save_for_backward, BackwardCFunction's apply /
    saved_tensors."""
    function_apply = Function.__dict__["apply"].__func__
    save_for_backward = FunctionCtx.save_for_backward
    backward_apply = BackwardCFunction.apply
    saved_getter = torch._C._FunctionBase.saved_tensors.__get__

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        out = function_apply(cls, *args, **kwargs)
        outputs = out if isinstance(out, tuple) else (out,)
        node = next(
            (o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None), None
        )
        if isinstance(node, BackwardCFunction):
            node._fc_inputs = None if kwargs else _tags(args)
            node._fc_outputs = _tags(outputs)
        return out

    def save(ctx: FunctionCtx, *tensors: torch.Tensor) -> None:
        ctx._fc_saved = _tags(tensors)
        save_for_backward(ctx, *tensors)

    def saved_tensors(node: BackwardCFunction) -> tuple:
        tensors = saved_getter(node)
        for t, tag in zip(tensors, getattr(node, "_fc_saved", ()), strict=False):
            if tag is not None:
                _mark(t, tag)  # a saved output comes back as a new tensor object, unmarked
        return tensors

    def backward(node: BackwardCFunction, *grads: Any) -> Any:
        for g, tag in zip(grads, getattr(node, "_fc_outputs", ()), strict=False):
            if isinstance(g, torch.Tensor) and tag is not None:
                _mark(g, tag)
        with contextlib.nullcontext() if mode in _get_current_function_mode_stack() else mode:
            result = backward_apply(node, *grads)
        returned = result if isinstance(result, tuple) else (result,)
        for i, (g, tag) in enumerate(zip(returned, getattr(node, "_fc_inputs", None) or (), strict=False)):
            if isinstance(g, torch.Tensor) and tag is not None and g.dim() > 0 and is_cuda(g) != tag:
                _fail(
                    f"{type(node).__name__} returned a gradient at index {i} on {_where(is_cuda(g))}, "
                    f"expected {_where(tag)}"
                )
        return result

    return {
        (Function, "apply"): classmethod(apply),
        (FunctionCtx, "save_for_backward"): save,
        (BackwardCFunction, "saved_tensors"): property(saved_tensors),
        (BackwardCFunction, "apply"): backward,
    }


def _patched_torch() -> dict[tuple[object, str], object]:
    """One visible CUDA device for torch.cuda / Lightning, and nn.Parameter keeping its data's device."""
    new_parameter = torch.nn.Parameter.__new__

    def parameter(
        cls: type, data: torch.Tensor | None = None, requires_grad: bool = True
    ) -> torch.nn.Parameter:
        return _mark(new_parameter(cls, data, requires_grad), is_cuda(data))  # _make_subclass: a new object

    return {
        (torch.cuda, "is_available"): lambda: True,
        (torch.cuda, "device_count"): lambda: 1,
        (torch.cuda, "set_device"): lambda device: None,
        (torch.cuda, "get_device_name"): lambda device=None: "fake_cuda",
        (torch.cuda, "get_device_capability"): lambda device=None: (9, 0),
        (torch.nn.Parameter, "__new__"): staticmethod(parameter),
    }


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCudaMode]:
    """Emulate one CUDA device inside the block; everything patched is restored on exit."""
    mode = FakeCudaMode()
    patches = {**_patched_torch(), **_patched_autograd(mode)}
    saved = {key: key[0].__dict__.get(key[1], _MISSING) for key in patches}
    device_order = os.environ.get("CUDA_DEVICE_ORDER")  # Lightning's CUDA accelerator sets it
    try:
        for (owner, attr), value in patches.items():
            setattr(owner, attr, value)
        with mode:
            yield mode
    finally:
        for (owner, attr), value in saved.items():
            if value is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)
        if device_order is None:
            os.environ.pop("CUDA_DEVICE_ORDER", None)
        else:
            os.environ["CUDA_DEVICE_ORDER"] = device_order


_MISSING = object()
