"""``python -m tests.helpers.compile_launches LAUNCHES.json OUT.json CAPABILITY``: compile recorded Triton launches
(:func:`tests.helpers.triton_launches.recorded_launches`) for an NVIDIA GPU of that compute capability, without a
GPU. Run without ``TRITON_INTERPRET``, so that ``triton.jit`` gives compilable ``JITFunction``s. Writes one
record per launch: ``{"module", "name", "triton", "error", "shared", "seconds"}``."""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict


def compile_launch(launch: Dict[str, Any], capability: int) -> Dict[str, Any]:
    """Compile one launch with ``triton.compile`` for ``cuda:<capability>``; its shared memory or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    signature, constexprs = {}, {}
    for param in kernel.params:
        kind, value = launch["args"][param.name]
        if param.is_constexpr or kind in ("none", "str"):
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif kind == "pointer":
            signature[param.name] = "*" + value
        elif kind == "int":
            signature[param.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        else:
            signature[param.name] = {"float": "fp32", "bool": "i1"}[kind]
    start = time.time()
    record = {"module": launch["module"], "name": launch["name"], "triton": triton.__version__, "error": None,
              "shared": None}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                  target=GPUTarget("cuda", capability, 32), options=launch["options"])
        record["shared"] = compiled.metadata.shared
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
