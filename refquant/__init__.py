"""refquant: the spec-level reference implementation of LLM quantization.

The NumPy code in this package is the specification: float64, one file per method, equations
numbered as in the papers, defaults and quirks as in the authors' code. GPU backends
(``backends/``) are validated against the golden outputs it writes (``golden/``).

    import refquant as rq
    spec = rq.QuantSpec(bits=4, group_size=128, sym=False)
    qw = rq.rtn(W, spec)
    H = rq.hessian(X)
    qw = rq.gptq(W, H, spec, blocksize=128, percdamp=0.01, act_order=False, static_groups=False)
    W_hat = qw.dequantize()
"""
from ._version import __version__
from .gptq import HessianNotPositiveDefinite, gptq
from .hessian import HessianAccumulator, hessian
from .quantizer import QuantizedWeight, QuantSpec
from .rtn import rtn

__all__ = [
    "__version__",
    "QuantSpec",
    "QuantizedWeight",
    "rtn",
    "hessian",
    "HessianAccumulator",
    "gptq",
    "HessianNotPositiveDefinite",
]
