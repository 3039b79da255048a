"""A fake accelerator for CPU tests: tensors that say they live on the `meta` device but hold
real CPU data, so code runs to the end (values, `.item()`, control flow) while every tensor's
placement is tracked.

`FakeDeviceMode` (a `TorchDispatchMode`) sees every ATen operation, autograd's backward
included:

- a factory call with ``device=meta`` (``torch.zeros(n, device=p.device)``), a ``.to(meta)``
  copy and every result of an operation on fake-device tensors is a fake-device tensor
  (`OnDevice`);
- an operation that mixes a fake-device tensor with a host tensor of one element or more
  (a buffer created without ``device=``, say) is recorded in `violations`: on a real GPU it
  would fail ("Expected all tensors to be on the same device") or copy silently. 0-dim host
  tensors are allowed, as CUDA allows them;
- ``.cpu()`` / ``.to("cpu")`` gives a host tensor (an explicit transfer), and ``.numpy()`` of a
  fake-device tensor fails, as it does for a CUDA tensor.

Host-only work (NumPy, host tensors that never meet the device) is not a violation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

FAKE_DEVICE = torch.device("meta")

_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class OnDevice(torch.Tensor):
    """A tensor on the fake device: reports `FAKE_DEVICE`, holds CPU data in `inner`."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> OnDevice:
        wrapped = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            device=FAKE_DEVICE,
            requires_grad=inner.requires_grad,
        )
        wrapped.inner = inner
        return wrapped

    def __repr__(self) -> str:  # type: ignore[override]
        return f"OnDevice({self.inner!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise RuntimeError(f"{func} on a fake-device tensor outside FakeDeviceMode")


class FakeDeviceMode(TorchDispatchMode):
    """Run tensors of the fake device on the CPU and record every mixing with host tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []
        #: Host tensors copied to the fake device (one entry per `.to(device)`), by shape.
        self.uploads: list[tuple[int, ...]] = []
        #: ATen operations run under the mode, on any device.
        self.operations = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.operations += 1
        on_device = False
        host: list[torch.Tensor] = []

        def unwrap(t: Any) -> Any:
            nonlocal on_device
            if isinstance(t, OnDevice):
                on_device = True
                return t.inner
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                host.append(t)
            return t

        args, kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        device = kwargs.get("device")
        to_device = device is not None and torch.device(device).type == FAKE_DEVICE.type
        to_host = device is not None and torch.device(device).type == "cpu"
        if to_device:
            kwargs["device"] = torch.device("cpu")
            if func is torch.ops.aten._to_copy.default and not on_device:
                self.uploads.append(tuple(host[0].shape) if host else ())
        if on_device and host and func not in _COPIES:
            shapes = ", ".join(str(tuple(t.shape)) for t in host)
            self.violations.append(f"{func}: host tensor(s) {shapes} meet fake-device tensors")
        out = func(*args, **kwargs)
        if (on_device or to_device) and not to_host:
            return tree_map(_wrap, out)
        return out


def _wrap(t: Any) -> Any:
    return OnDevice(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) else t
