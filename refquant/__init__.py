"""refquant: the spec-level reference implementation of LLM quantization.

The package has three layers, and imports point down only (``docs/architecture.md``; an
import-linter contract in ``pyproject.toml`` keeps it so):

* ``refquant.spec``: the specification -- float64 NumPy/SciPy, one file per method, equations
  numbered as in the papers, defaults and quirks as in the authors' code; weight formats; the NumPy
  LLaMA; perplexity math;
* ``refquant.backends``: the same algorithms on torch (fast, GPU) and CuPy, validated against the
  golden outputs the spec writes (``golden/``);
* the application: the layer-loop runner (``pipeline``, ``torch_pipeline``), one wiring unit per
  method (``refquant.methods``), runs and resume (``runs``), the CLI and the main job.

    import refquant as rq
    spec = rq.QuantSpec(bits=4, group_size=128, sym=False)
    qw = rq.rtn(W, spec)
    H = rq.hessian(X)
    qw = rq.gptq(W, H, spec, blocksize=128, percdamp=0.01, act_order=False, static_groups=False)
    W_hat = qw.dequantize()

The spec modules of the equalization methods are attributes: ``rq.awq``, ``rq.smoothquant``,
``rq.aweq``, ``rq.actquant`` (and ``rq.equalize``, ``rq.llama``, ``rq.formats``).
"""
from ._version import __version__
from .spec import actquant, awq, aweq, equalize, formats, llama, quantizer, smoothquant
from .spec.billm import billm
from .spec.dbllm import dbllm
from .spec.formats import (
    AffineWeight, BinaryWeight, CodebookWeight, DualBinaryWeight, MixedWeight, PartialBinaryWeight, QuantizedWeight,
    QuipWeight, StructuredBinaryWeight, WeightFormat,
)
from .spec._checks import NotApplicable
from .spec.gptq import HessianNotPositiveDefinite, gptq
from .spec.hessian import HessianAccumulator, hessian
from .spec.icq import ICQWeight, icq
from .spec.normalfloat import NF4Weight, nf4
from .spec.pbllm import pbllm
from .spec.quantizer import QuantSpec
from .spec.quip import HessianNotPositiveDefinite as QuipHessianNotPositiveDefinite, quip
from .spec.rtn import rtn
from .spec.slim import slim_allocate, slim_llm
from . import methods  # noqa: F401  (the application: every method's wiring unit registers itself)

__all__ = [
    "__version__",
    "QuantSpec",
    "QuantizedWeight",
    "AffineWeight",
    "BinaryWeight",
    "CodebookWeight",
    "WeightFormat",
    "rtn",
    "pbllm",
    "billm",
    "PartialBinaryWeight",
    "StructuredBinaryWeight",
    "dbllm",
    "DualBinaryWeight",
    "hessian",
    "HessianAccumulator",
    "gptq",
    "nf4",
    "icq",
    "NF4Weight",
    "ICQWeight",
    "HessianNotPositiveDefinite",
    "NotApplicable",
    "actquant",
    "awq",
    "aweq",
    "equalize",
    "formats",
    "llama",
    "quantizer",
    "smoothquant",
    "MixedWeight",
    "slim_allocate",
    "slim_llm",
    "quip",
    "QuipWeight",
    "QuipHessianNotPositiveDefinite",
]
