"""Compiling the Triton kernels for a Hopper GPU on a machine without one.

:func:`recorded_launches` records every kernel launch an op makes under Triton's CPU interpreter (the kernel, its
argument values, ``num_warps`` and ``num_stages``). :func:`compile_for_gpu` then compiles each distinct launch with
Triton's own compiler for ``sm_90`` (H100/H200) in a process without ``TRITON_INTERPRET``, down to the cubin
(ptxas ships with triton), and returns each kernel's shared memory. So a kernel that the interpreter runs but the
compiler rejects (a loop-carried value changing type, a non-constexpr in a ``tl.static_range``, a dot shape the
MMA cannot take), or a tile configuration that needs more shared memory than an SM has, fails on the CPU instead
of on the first GPU run. Arguments are specialised as the JIT would (pointers by dtype, ``int`` as i32/i64);
the divisibility hints the JIT adds for aligned pointers and sizes are not, so a compile here is the slower,
unaligned variant, which is the one with more masking.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRITON_PATH_VARIABLE = "NSA_COMPILE_TRITON_PATH"  # a folder holding another triton package to compile with
SM90_SHARED_MEMORY = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)

_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                    torch.bool: "i1"}


def _encode(value: Any) -> Tuple[str, Any]:
    """A launch argument as JSON: ("pointer", element type), ("int" | "float" | "bool" | "str" | "none", value)."""
    import triton.language as tl

    if isinstance(value, tl.constexpr):
        value = value.value
    if isinstance(value, torch.Tensor):
        return "pointer", _TORCH_TO_TRITON[value.dtype]
    if value is None:
        return "none", None
    for kind, types in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(value, types):
            return kind, value
    raise TypeError(f"cannot record a Triton launch argument of type {type(value).__name__}: {value!r}")


@contextmanager
def recorded_launches() -> Iterator[List[Dict[str, Any]]]:
    """Within the block, every kernel launched under ``TRITON_INTERPRET=1`` is appended to the yielded list as
    ``{"module", "name", "args": {param: (kind, value)}, "options": {"num_warps", "num_stages"}}`` (and still
    runs). RuntimeError when Triton is not in interpreter mode."""
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("recorded_launches needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    launches: List[Dict[str, Any]] = []
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        names = list(self.arg_names)
        bound = dict(zip(names, args))
        bound.update((k, v) for k, v in kwargs.items() if k in names)
        launches.append({"module": self.fn.__module__, "name": self.fn.__name__,
                         "args": {k: _encode(v) for k, v in bound.items()},
                         "options": {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}})
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        yield launches
    finally:
        InterpretedFunction.run = run


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
