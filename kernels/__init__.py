"""Triton kernels of bertfast, installed as ``bertfast.kernels``.

One op per module (attention, layer_norm, gelu): the private @triton.jit kernels, the launcher that checks its
inputs and picks block sizes through :mod:`bertfast.kernels.config`, and ``aot_specs()`` listing every
configuration the launcher can pick, for the ahead-of-time compile report (:mod:`bertfast.kernels.report`).
Modules import triton lazily from here: importing ``bertfast.kernels`` itself never needs triton.
"""
