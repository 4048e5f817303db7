"""Shared test helpers, imported by package (``from tests.helpers import oracle as O``), also inside spawned ranks.

* :mod:`~tests.helpers.oracle`: brute-force float64 NSA oracle.
* :mod:`~tests.helpers.segments`: query and key segments as the context-parallel layer cuts them.
* :mod:`~tests.helpers.small_tiles`: tiny range-attention tiles for the Triton kernel tests.
* :mod:`~tests.helpers.cp_harness`, :mod:`~tests.helpers.cp_cases`: gloo ranks and inputs of the CP tests.
* :mod:`~tests.helpers.gpt_cases`: tiny megatron-core GPTs run on gloo ranks.
* :mod:`~tests.helpers.deepspeed_jobs`: tiny DeepSpeed training jobs and their launcher.
* :mod:`~tests.helpers.quality_scripts`: the scripts of benchmarks/quality, loaded by file.
"""
