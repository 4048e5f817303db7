"""``python -m tests.helpers.compile_launches LAUNCHES.json OUT.json CAPABILITY``: compile recorded Triton launches
(:func:`tests.helpers.triton_launches.recorded_launches`) for an NVIDIA GPU of that compute capability, without a
GPU. Run without ``TRITON_INTERPRET``, so that ``triton.jit`` gives compilable ``JITFunction``s. Writes one
record per launch: ``{"module", "name", "triton", "error", "shared", "registers", "stack", "local", "seconds"}``."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """Per-thread ``registers``, ``stack`` and ``local`` bytes of a compiled kernel (nonzero stack or local
    memory means spills), as ``cuobjdump -res-usage`` (shipped with triton) reports them."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if usage is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-2000:]}")
    return dict(zip(("registers", "stack", "local"), map(int, usage.groups())))


def compile_launch(launch: Dict[str, Any], capability: int) -> Dict[str, Any]:
    """Compile one launch with ``triton.compile`` for ``cuda:<capability>``, its arguments specialised as
    recorded (constants, types, 16-divisibility hints); its resources, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        arg = launch["args"][param.name]
        unspecialised_one = arg["type"] == "constexpr" and arg["value"] == 1 and param.do_not_specialize
        if param.is_constexpr or (arg["type"] == "constexpr" and not unspecialised_one):
            signature[param.name], constexprs[param.name] = "constexpr", arg["value"]
            continue
        signature[param.name] = "i32" if arg["type"] == "constexpr" else arg["type"]  # a 1 left unspecialised
        if arg["attr"] == "D" and not (param.do_not_specialize or param.do_not_specialize_on_alignment):
            attrs[(index,)] = [["tt.divisibility", 16]]
    start = time.time()
    record = {"module": launch["module"], "name": launch["name"], "triton": triton.__version__, "error": None,
              "shared": None, "registers": None, "stack": None, "local": None}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", capability, 32), options=launch["options"])
        record["shared"] = compiled.metadata.shared
        record.update(resource_usage(compiled.asm["cubin"]))
    except Exception:  # the compiler's message is the result
        record["error"] = traceback.format_exc(limit=3)[-4000:]
    record["seconds"] = round(time.time() - start, 2)
    return record


def main(src: str, dst: str, capability: str) -> None:
    with open(src) as f:
        launches = json.load(f)
    with ProcessPoolExecutor(max_workers=min(len(launches), os.cpu_count() or 1) or 1) as pool:
        results = list(pool.map(compile_launch, launches, [int(capability)] * len(launches)))
    with open(dst, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
