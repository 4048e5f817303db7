"""Choose the implementation of an op: the Triton kernel or the plain-PyTorch reference.

``NSA_KERNELS_BACKEND`` (``auto`` by default, ``triton`` or ``reference``) sets the choice. ``auto`` runs
Triton for CUDA tensors and, on the CPU, when ``TRITON_INTERPRET=1`` (Triton's interpreter), else the
reference. :func:`use_backend` overrides it for a block of code.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Callable, Iterator, Optional

import torch

from .triton.utils import triton_interpreting

BACKENDS = ("auto", "triton", "reference")
TRITON_MODULES = {  # op name -> module of nsa_kernels.triton that defines it
    "compressed_attention": "compressed_attention",
    "select_blocks": "select_blocks",
    "selected_attention": "selected_attention",
    "window_attention": "window_attention",
    "nsa_attention": "nsa",
    "gate_combine": "gate_combine",
    "block_max_logits": "block_max",
}
_override: Optional[str] = None


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed ops with backend ``name`` (``auto``, ``triton`` or ``reference``)."""
    global _override
    previous, _override = _override, _check_backend(name, "backend")
    try:
        yield
    finally:
        _override = previous


def selected_backend(q: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for an op whose query tensor is ``q``."""
    choice = _override or _check_backend(os.environ.get("NSA_KERNELS_BACKEND", "auto"), "NSA_KERNELS_BACKEND")
    if choice != "auto":
        return choice
    return "triton" if (q.is_cuda or triton_interpreting()) else "reference"


@functools.lru_cache(maxsize=None)
def triton_op(name: str) -> Callable:
    """The Triton implementation of op ``name`` (imported on first use)."""
    try:
        module = importlib.import_module(f"nsa_kernels.triton.{TRITON_MODULES[name]}")
    except ImportError as exc:
        raise ImportError(f"the Triton kernels need the `triton` package ({exc}); install it (`pip install "
                          "triton`, Linux) or set NSA_KERNELS_BACKEND=reference") from exc
    return getattr(module, name)


def dispatching(reference_fn: Callable) -> Callable:
    """Wrap ``reference_fn`` so that each call runs the backend chosen for its first (query) argument."""
    name = reference_fn.__name__

    @functools.wraps(reference_fn)
    def op(q, *args, **kwargs):
        if selected_backend(q) == "triton":
            return triton_op(name)(q, *args, **kwargs)
        return reference_fn(q, *args, **kwargs)

    return op
