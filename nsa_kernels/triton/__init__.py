"""Triton kernels of the NSA ops: same names and signatures as :mod:`nsa_kernels.reference`.

Imported lazily by the dispatcher, so ``TRITON_INTERPRET=1`` set before the first call still takes effect.
"""
