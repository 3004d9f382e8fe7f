"""The typed operations of a backend, one :class:`typing.Protocol` per method family.

A backend object (:func:`refquant.backends.get_backend`) is composed of one plain mixin class per
family it implements, next to that family's code:

=====================  ==========================================  ===================================
protocol               numpy (the reference itself)                torch
=====================  ==========================================  ===================================
:class:`QuantOps`      ``numpy_quant.NumpyQuantOps``               ``torch_quant.TorchQuantOps``
:class:`GPTQOps`       ``numpy_quant.NumpyGPTQOps``                ``torch_quant.TorchGPTQOps``
:class:`PipelineOps`   ``pipeline_ops.NumpyPipelineOps``           ``pipeline_ops.TorchPipelineOps``
:class:`EqualizationOps` ``equalization_ops.NumpyEqualizationOps``  ``equalization_ops.TorchEqualizationOps``
:class:`AWQOps`        ``equalization_ops.NumpyAWQOps``            ``equalization_ops.TorchAWQOps``
=====================  ==========================================  ===================================

The CuPy backend implements :class:`QuantOps` and :class:`GPTQOps`. The protocols are
``runtime_checkable``: ``isinstance(backend, AWQOps)`` says whether a backend has every AWQ twin
(it checks that the methods exist; their signatures are checked by ``tests/test_backends.py``).
Every numpy method *is* a reference function of :mod:`refquant.spec` on NumPy copies of its inputs;
the other backends take and return their own arrays and meet the parity rules of
``docs/backends.md`` / ``refquant/golden.py``.

Implementations may add keyword arguments with defaults (torch: ``use_triton`` of ``gptq``,
``keep_device`` of ``channel_stats``); the parameters below are the ones the application uses.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..spec.awq import CLIP_MAX_SHRINK, CLIP_N_GRID, CLIP_N_SAMPLE_TOKENS, N_GRID

__all__ = ["QuantOps", "GPTQOps", "PipelineOps", "EqualizationOps", "AWQOps", "DBLLMOps", "SliMOps", "NormalFloatOps", "QuipOps", "BinarizationOps", "PROTOCOLS"]


@runtime_checkable
class QuantOps(Protocol):
    """Round-to-nearest quantization and the moves between the backend's arrays and NumPy."""

    def asarray(self, x):
        """``x`` (NumPy, CuPy or torch) as this backend's array (implementations may take ``device``)."""
        ...

    def rtn(self, W, spec):
        """:func:`refquant.spec.rtn.rtn`: a :class:`refquant.QuantizedWeight` of this backend's arrays."""
        ...

    def to_numpy(self, x):
        """A NumPy array of ``x`` (results to the host, e.g. for saving)."""
        ...

    def like(self, a, ref):
        """``a`` (small NumPy vectors from the reference) as this backend's float array next to ``ref``."""
        ...


@runtime_checkable
class GPTQOps(Protocol):
    """The GPTQ Hessian and GPTQ itself (:mod:`refquant.spec.hessian`, :mod:`refquant.spec.gptq`)."""

    def hessian(self, X):
        """:func:`refquant.spec.hessian.hessian`."""
        ...

    def hessian_accumulator(self, in_features, device=None):
        """A streaming :class:`refquant.spec.hessian.HessianAccumulator` (``add_batch``, ``H``, ``nsamples``)."""
        ...

    def gptq(self, W, H, spec, blocksize=128, percdamp=0.01, act_order=False, static_groups=False, *,
             max_percdamp=None, percdamp_step=0.01):
        """:func:`refquant.spec.gptq.gptq`."""
        ...

    def gptq_shared(self, Ws, H, spec, blocksize=128, percdamp=0.01, act_order=False, static_groups=False, *,
                    max_percdamp=None, percdamp_step=0.01):
        """Several matrices with one Hessian; equal to ``[gptq(W, H, spec, ...) for W in Ws]``."""
        ...


@runtime_checkable
class PipelineOps(Protocol):
    """Calibration statistics and activation quantization that the layer loop needs."""

    def channel_stats(self, kinds, in_features, device=None):
        """A :class:`refquant.spec.stats.ChannelStats` (``add(x)``; ``H``, ``absmax``, ``mean_abs``, ...)."""
        ...

    def quantize_activation(self, x, bits, mode="per_token", static_scale=None):
        """:func:`refquant.spec.actquant.quantize_activation`."""
        ...

    def static_act_scale(self, absmax, bits):
        """:func:`refquant.spec.actquant.static_scale_from_absmax` of ``max(absmax)``, a Python float."""
        ...


@runtime_checkable
class EqualizationOps(Protocol):
    """Per-channel scales and the weight transforms of SmoothQuant and AWEQ (folding, bias correction)."""

    def smooth_scales(self, x_absmax, Ws, alpha):
        """:func:`refquant.spec.smoothquant.smooth_scales`."""
        ...

    def equalization_scales(self, x_range, Ws):
        """:func:`refquant.spec.aweq.equalization_scales` (AWEQ eq. (10))."""
        ...

    def bias_correction(self, W, W_q, x_mean):
        """:func:`refquant.spec.aweq.bias_correction` (AWEQ eq. (15))."""
        ...

    def scale_weight(self, W, s):
        """:func:`refquant.spec.equalize.scale_weight` (``W diag(s)``)."""
        ...

    def fold_into_norm(self, norm_weight, s):
        """:func:`refquant.spec.equalize.fold_into_norm` (``gamma / s``)."""
        ...

    def fold_into_linear(self, W_prev, s, b_prev=None):
        """:func:`refquant.spec.equalize.fold_into_linear` (the last ``len(s)`` rows ``/ s``)."""
        ...


@runtime_checkable
class AWQOps(EqualizationOps, Protocol):
    """AWQ's scale and clip searches (:mod:`refquant.spec.awq`), plus the folding of :class:`EqualizationOps`."""

    def awq_linear_stats(self):
        """The :meth:`PipelineOps.channel_stats` kinds :meth:`awq_search_scale_stats` needs for a linear group."""
        ...

    def awq_search_scale(self, X, Ws, spec, block=None, n_grid=N_GRID, duo_scaling=False, chunk=None):
        """:func:`refquant.spec.awq.search_scale` (``chunk``: sequences per block call, a hint)."""
        ...

    def awq_search_scale_stats(self, stats, Ws, spec, n_grid=N_GRID, duo_scaling=False, n_sequences=None):
        """:func:`refquant.spec.awq.search_scale` of a linear group from its :meth:`awq_linear_stats`."""
        ...

    def awq_search_clip(self, X, W, spec, n_grid=CLIP_N_GRID, max_shrink=CLIP_MAX_SHRINK,
                        n_sample_tokens=CLIP_N_SAMPLE_TOKENS):
        """:func:`refquant.spec.awq.search_clip`."""
        ...

    def apply_clip(self, W, max_val, group_size):
        """:func:`refquant.spec.awq.apply_clip`."""
        ...


@runtime_checkable
class DBLLMOps(Protocol):
    """DB-LLM's Flexible Dual Binarization (:mod:`refquant.spec.dbllm`)."""

    def dbllm(self, W, H=None, *, group_size=128, sym=False, offset="zero_point", steps=0, resplit=True):
        """:func:`refquant.spec.dbllm.dbllm`: a :class:`refquant.DualBinaryWeight` of this backend's arrays."""
        ...


@runtime_checkable
class SliMOps(Protocol):
    """SliM-LLM's allocation search and quantizer (:mod:`refquant.spec.slim`)."""

    def slim_search(self, W, H, X, *, bits, group_size=128):
        """:func:`refquant.spec.slim.slim_search`: a :class:`refquant.spec.slim.SliMSearch` (host NumPy arrays)."""
        ...

    def slim_allocate(self, W, H, X, *, bits, group_size=128):
        """:func:`refquant.slim_allocate`: int64 NumPy array of per-group widths."""
        ...

    def slim_llm(self, W, H, *, bits, group_bits, group_size=128, percdamp=0.01, lambda_salience=1.0,
                 sym_quirk=True, salience_damp=0.01):
        """:func:`refquant.slim_llm`: a :class:`refquant.MixedWeight` of this backend's arrays."""
        ...


@runtime_checkable
class NormalFloatOps(Protocol):
    """NF4 (bitsandbytes' CUDA kernel) and IR-QLoRA's ICQ (:mod:`refquant.spec.normalfloat`, :mod:`refquant.spec.icq`)."""

    def nf4(self, W, *, blocksize=64, double_quant=False):
        """:func:`refquant.nf4`: a :class:`refquant.NF4Weight` of this backend's arrays."""
        ...

    def icq(self, W, *, blocksize=64, double_quant=False, tau_range=0.1, tau_n=100, blocksize2=256):
        """:func:`refquant.icq`: a :class:`refquant.ICQWeight` of this backend's arrays."""
        ...


@runtime_checkable
class QuipOps(Protocol):
    """QuIP: incoherence processing + LDLQ (:mod:`refquant.spec.quip`)."""

    def quip(self, W, H, *, bits, U=None, V=None, seed=0, rescale=True, incoherence=True, rounding="ldlq",
             npasses=0, percdamp=0.01):
        """:func:`refquant.quip`: a :class:`refquant.QuipWeight` of this backend's arrays."""
        ...

    def quip_many(self, Ws, Hs, seeds, *, bits, rescale=True, incoherence=True, rounding="ldlq", npasses=0,
                  percdamp=0.01):
        """Several matrices, each with its own Hessian and seed; equal to separate :meth:`quip` calls."""
        ...


@runtime_checkable
class BinarizationOps(Protocol):
    """PB-LLM and BiLLM (:mod:`refquant.spec.pbllm`, :mod:`refquant.spec.billm`; shared primitives in
    :mod:`refquant.spec.binarize`)."""

    def pbllm(self, W, H, *, low_frac=0.9, high_bits=8, salient_metric="hessian", blocksize=128, percdamp=0.01,
              group_size=None, binarizer_stats="code"):
        """:func:`refquant.pbllm`: a :class:`refquant.PartialBinaryWeight` of this backend's arrays."""
        ...

    def pbllm_shared(self, Ws, H, *, low_frac=0.9, high_bits=8, salient_metric="hessian", blocksize=128,
                     percdamp=0.01, group_size=None, binarizer_stats="code"):
        """Several matrices with one Hessian; equal to ``[pbllm(W, H, ...) for W in Ws]``."""
        ...

    def billm(self, W, H, *, blocksize=128, percdamp=0.01, salient_metric="hessian", search_on="saliency",
              narrow_blocks="extend"):
        """:func:`refquant.billm`: a :class:`refquant.StructuredBinaryWeight` of this backend's arrays."""
        ...

    def billm_shared(self, Ws, H, *, blocksize=128, percdamp=0.01, salient_metric="hessian", search_on="saliency",
                     narrow_blocks="extend"):
        """Several matrices with one Hessian; equal to ``[billm(W, H, ...) for W in Ws]``."""
        ...


PROTOCOLS = (QuantOps, GPTQOps, PipelineOps, EqualizationOps, AWQOps, DBLLMOps, SliMOps, NormalFloatOps, QuipOps,
             BinarizationOps)
"""Every operation family, for discovery (``[p.__name__ for p in PROTOCOLS if isinstance(be, p)]``)."""
