"""Compiling the Triton kernels for a Hopper GPU on a machine without one.

:func:`recorded_launches` records every kernel launch an op makes under Triton's CPU interpreter (the kernel, its
argument values, ``num_warps`` and ``num_stages``). :func:`compile_for_gpu` then compiles each distinct launch with
Triton's own compiler for ``sm_90`` (H100/H200) in a process without ``TRITON_INTERPRET``, down to the cubin
(ptxas ships with triton), and returns each kernel's shared memory. So a kernel that the interpreter runs but the
compiler rejects (a loop-carried value changing type, a non-constexpr in a ``tl.static_range``, a dot shape the
MMA cannot take), or a tile configuration that needs more shared memory than an SM has, fails on the CPU instead
of on the first GPU run. Arguments are specialised as Triton's JIT specialises them (its own
``native_specialize_impl``: pointer and integer types, 16-divisibility of pointers and sizes, integers equal to 1
as constants), so registers and shared memory are those of the binary the GPU would run for the same inputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRITON_PATH_VARIABLE = "NSA_COMPILE_TRITON_PATH"  # a folder holding another triton package to compile with
SM90_SHARED_MEMORY = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)

def _encode(value: Any) -> Dict[str, Any]:
    """A launch argument as JSON, specialised as Triton's JIT specialises it (``native_specialize_impl``, pointers
    and integers checked for 16-alignment): ``{"type": "*bf16" | "i32" | ... | "constexpr", "attr": "D" (divisible
    by 16) or "" or None, "value": the scalar (None for a tensor)}``."""
    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if isinstance(value, tl.constexpr):
        value = value.value
    if isinstance(value, str):  # only ever a constexpr
        return {"type": "constexpr", "attr": None, "value": value}
    kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
    return {"type": kind, "attr": attr, "value": None if isinstance(value, torch.Tensor) else value}


@contextmanager
def recorded_launches() -> Iterator[List[Dict[str, Any]]]:
    """Within the block, every kernel launched under ``TRITON_INTERPRET=1`` is appended to the yielded list as
    ``{"module", "name", "args": {param: specialisation}, "options": {"num_warps", "num_stages"}}`` (and still
    runs). The kernels get the dtypes they get on a GPU: bf16 stays bf16, where outside this block the interpreter
    runs it in fp32 (:func:`nsa_kernels.triton.utils.kernel_dtype`), because the interpreter's bf16 ``tl.dot`` is
    wrong; so the numbers computed inside the block are not to be used, only the launches. RuntimeError when
    Triton is not in interpreter mode."""
    from triton.runtime.interpreter import InterpretedFunction

    import nsa_kernels.triton.utils as kernel_utils

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("recorded_launches needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    launches: List[Dict[str, Any]] = []
    run, interpreting = InterpretedFunction.run, kernel_utils.triton_interpreting

    def recording_run(self, *args, grid, warmup, **kwargs):
        names = list(self.arg_names)
        bound = dict(zip(names, args))
        bound.update((k, v) for k, v in kwargs.items() if k in names)
        launches.append({"module": self.fn.__module__, "name": self.fn.__name__,
                         "args": {k: _encode(v) for k, v in bound.items()},
                         "options": {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}})
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    kernel_utils.triton_interpreting = lambda: False  # bf16 stays bf16 (kernel_dtype) as on the GPU
    try:
        with warnings.catch_warnings():  # numpy's overflow warnings from those wrong bf16 numbers
            warnings.simplefilter("ignore", RuntimeWarning)
            yield launches
    finally:
        InterpretedFunction.run, kernel_utils.triton_interpreting = run, interpreting


def compile_for_gpu(launches: List[Dict[str, Any]], tmp_dir: str, capability: int = 90) -> List[Dict[str, Any]]:
    """Compile every launch of ``launches`` (from :func:`recorded_launches`) for ``sm_<capability>`` in a fresh
    process without ``TRITON_INTERPRET`` (identical launches once, on every core), with the Triton of this
    environment, or the one in the folder ``$NSA_COMPILE_TRITON_PATH`` names (``pip install --no-deps --target
    /tmp/triton36 triton==3.6.0`` gives the GPU image's version). Returns, for each launch in order,
    ``{"module", "name", "triton": its version, "error": str | None, "shared": bytes of shared memory or None,
    "seconds"}``."""
    keys = [json.dumps(launch, sort_keys=True) for launch in launches]
    unique = list(dict.fromkeys(keys))
    src, dst = os.path.join(tmp_dir, "launches.json"), os.path.join(tmp_dir, "compiled.json")
    with open(src, "w") as f:
        json.dump([json.loads(key) for key in unique], f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if os.environ.get(TRITON_PATH_VARIABLE):  # another Triton first on the path, e.g. the GPU image's version
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env[TRITON_PATH_VARIABLE], env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.compile_launches", src, dst, str(capability)],
                          capture_output=True, text=True, env=env, timeout=1800, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"the compile process failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(dst) as f:
        records = dict(zip(unique, json.load(f), strict=True))
    return [records[key] for key in keys]
