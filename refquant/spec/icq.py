"""IR-QLoRA's Information Calibration Quantization (ICQ) for NF4, as htqin/IR-QLoRA's code does it.

Paper: Qin, Ma, Zheng, Zhang, Lv, Chen, Xu, Liu, Wang, Liu, Magno, "Accurate LoRA-Finetuning
Quantization of LLMs via Information Retention" (IR-QLoRA, ICML 2024), Sec. 3.2 "Information
Calibration Quantization": ``W_NF4 = NF4(W - tau)`` with ``tau* = argmax_tau H(NF4(W - tau))`` (the
entropy of the quantized block), searched on a symmetric grid around the block median
(``tau = tau0 + lambda * sigma * A``), ``tau`` stored with 8-bit double quantization. (The paper is not
in ``../shared/docs/papers``; its equation numbers are not cited here because they could not be
checked. The code below is the reference.)

Original code: htqin/IR-QLoRA, commit e6fef4ac13f311350b51bc59aaf971cf6bef021b, ``utils.py``:
``sigma`` (module level), ``search``, ``nf4_quant``, ``evaluate_entropy``, ``quantize_tensor``,
``dequantize_tensor``, ``IRQLoraLinear4bit.forward`` (the dequantization ``NF4 + tau``). It quantizes
with bitsandbytes' CUDA kernel (``Params4bit``, blocksize 64), so the NF4 step here is
:mod:`refquant.spec.normalfloat` (float32, the kernel's thresholds).

Per block ``b`` of ``blocksize`` consecutive row-major weights ``w`` (float32; the original runs on
the float32 weights of a second full-precision model load):

1. ``tau0`` = the block's *lower* median (``torch.median``: element ``(blocksize - 1) // 2`` of the
   sorted block, not the mean of the two middle ones); ``A = max |w - tau0|`` (float32).
2. ``sigma = 1 / ppf(float32(0.9677083))`` with the ppf rounded to float32 (scipy on the float32
   ``torch.linspace`` value): :data:`ICQ_SIGMA`, the NF4 "unit" in standard deviations.
3. Factors ``f`` = ``np.linspace(-tau_range * sigma, tau_range * sigma, 2 * tau_n + 1)`` (float64),
   used as float32 (torch multiplies a float32 tensor by the scalar in float32):
   ``tau = float32(float32(f) * A) + tau0``.
4. Codes of ``w - tau`` (float32) by NF4 with the absmax recomputed on the shifted block; the
   entropy ``-sum_c p_c log2 p_c`` of the block's 16-code histogram, ``p_c = count_c / blocksize``.
5. The first factor is the initial best; a later factor replaces it only on strictly higher entropy
   (``torch.where(entropy > entropy_max, ...)``): ties keep the earlier, more negative factor.
6. Stored: NF4 of ``w - tau*`` (double quantization of its absmax as configured) and ``tau*``
   compressed in groups of ``blocksize2`` blocks: ``tau2 = max |tau|`` (float32), ``tau_codes`` =
   the first index of the minimum of ``|float32(tau / tau2) - DYNAMIC_MAP|`` (``argmin``, float32);
   dequantized ``float32(DYNAMIC_MAP[tau_codes] * tau2)``.
7. ``W_hat = float32(NF4 dequantized + tau_hat[block])`` (``IRQLoraLinear4bit.forward``).

Differences from the original, all documented in ``docs/methods/icq.md``:

* the entropy is computed from a table of float32-rounded terms ``float32(-p log2 p)`` (one per
  count 0..blocksize) summed in float32 in code order 0..15; the original computes ``log2`` and the
  product on the GPU (``log2f``, within an ulp) and sums with torch's reduction order. Equal
  histograms (as count multisets in the same code order) get equal entropies on every backend here;
  an exact tie in the original can differ by an ulp and flip the tie rule;
* the original needs ``numel`` divisible by ``blocksize * blocksize2`` (its ``reshape(-1, 256, 64)``);
  here only by ``blocksize`` (the last tau group may be partial: its ``tau2`` is the max over its
  remaining blocks);
* a tau group with ``tau2 = 0`` (every tau exactly zero) divides 0/0 = NaN in the original, and
  ``argmin`` of an all-NaN row is index 0; here index 0 explicitly (``DYNAMIC_MAP[0] * 0 = -0``).

``bits_per_weight``: the NF4 accounting plus ``8/blocksize + 32/(blocksize * blocksize2)`` for tau.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from array_api_compat import array_namespace

from .formats import FLOAT_BITS, _check_shape, register_format
from .normalfloat import (DYNAMIC_MAP, NF4Weight, _check_nf4_parts, _device, _dtype_is, _lut, check_blocksize,
                          double_dequantize, double_quantize, nf4_blockwise, weight_fp32)
from .progress import progress

__all__ = ["ICQ_SIGMA", "ICQWeight", "icq", "icq_factors", "entropy_table", "block_entropy", "lower_median",
           "compress_tau", "decompress_tau", "check_icq_args"]

#: ``norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1]).tolist()[0]``: scipy's ppf of the float32 offset,
#: rounded to float32 by scipy's float32 loop (``utils.py`` module level).
PPF_OFFSET = 1.8481308221817017

#: ``sigma`` of ``utils.py``: ``1 / PPF_OFFSET``.
ICQ_SIGMA = 1.0 / PPF_OFFSET


def check_icq_args(blocksize, tau_range, tau_n, blocksize2) -> tuple[int, float, int, int]:
    blocksize = check_blocksize(blocksize)
    if isinstance(tau_n, bool) or not isinstance(tau_n, (int, np.integer)) or tau_n < 0:
        raise ValueError(f"tau_n must be an integer >= 0 (2 * tau_n + 1 candidates); got {tau_n!r}.")
    if isinstance(tau_range, bool) or not isinstance(tau_range, (int, float)) or not (math.isfinite(tau_range)
                                                                                     and tau_range >= 0):
        raise ValueError(f"tau_range must be a finite number >= 0 (half-width in units of sigma); got {tau_range!r}.")
    if isinstance(blocksize2, bool) or not isinstance(blocksize2, (int, np.integer)) or blocksize2 < 1:
        raise ValueError(f"blocksize2 must be a positive integer (blocks per tau group); got {blocksize2!r}.")
    return blocksize, float(tau_range), int(tau_n), int(blocksize2)


def icq_factors(tau_range: float = 0.1, tau_n: int = 100) -> np.ndarray:
    """The candidate factors as the search uses them: ``np.linspace(-tau_range*sigma, tau_range*sigma,
    2*tau_n + 1)`` rounded to float32."""
    return np.linspace(-tau_range * ICQ_SIGMA, tau_range * ICQ_SIGMA, tau_n * 2 + 1).astype(np.float32)


def entropy_table(blocksize: int) -> np.ndarray:
    """``T[c] = float32(-(c/blocksize) log2(c/blocksize))`` for counts ``c = 0..blocksize`` (``T[0] = 0``)."""
    c = np.arange(blocksize + 1, dtype=np.float64)
    p = c / blocksize
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(c > 0, -p * np.log2(np.where(c > 0, p, 1.0)), 0.0)
    return t.astype(np.float32)


def block_entropy(codes_blocks: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Entropy of each row's 16-code histogram: ``table[count_c]`` summed in float32 over ``c = 0..15`` in order."""
    n_blocks = codes_blocks.shape[0]
    counts = np.zeros((n_blocks, 16), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n_blocks), codes_blocks.shape[1]), codes_blocks.reshape(-1).astype(np.int64)), 1)
    terms = table[counts]
    ent = np.zeros(n_blocks, dtype=np.float32)
    for c in range(16):
        ent = ent + terms[:, c]
    return ent


def lower_median(blocks: np.ndarray) -> np.ndarray:
    """``torch.median`` along the last axis: element ``(n - 1) // 2`` of the sorted values."""
    return np.sort(blocks, axis=-1)[:, (blocks.shape[-1] - 1) // 2]


def compress_tau(tau: np.ndarray, blocksize2: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tau_codes uint8, tau2 float32)``: ``tau2 = max |tau|`` per group of ``blocksize2``; the first
    index of the minimum of ``|float32(tau / tau2) - DYNAMIC_MAP|`` (index 0 where ``tau2 = 0``)."""
    tau = np.asarray(tau, dtype=np.float32)
    n = tau.shape[0]
    groups = -(-n // blocksize2)
    padded = np.zeros(groups * blocksize2, dtype=np.float32)
    padded[:n] = tau
    tau2 = np.abs(padded.reshape(groups, blocksize2)).max(axis=1)
    g = np.arange(n) // blocksize2
    with np.errstate(divide="ignore", invalid="ignore"):
        y = tau / tau2[g]
    codes = np.empty(n, dtype=np.uint8)
    chunk = 1 << 16
    for s in range(0, n, chunk):
        d = np.abs(y[s:s + chunk, None] - DYNAMIC_MAP[None, :])
        codes[s:s + chunk] = np.argmin(d, axis=1)
    codes[np.isnan(y)] = 0
    return codes, tau2


def decompress_tau(tau_codes, tau2, blocksize2: int) -> np.ndarray:
    """``float32(DYNAMIC_MAP[tau_codes] * tau2[group])``."""
    q = np.asarray(tau_codes).astype(np.int64)
    return DYNAMIC_MAP[q] * np.asarray(tau2, dtype=np.float32)[np.arange(q.shape[0]) // blocksize2]


@register_format("icq")
@dataclass(frozen=True, eq=False)
class ICQWeight(NF4Weight):
    """An ICQ weight: :class:`~refquant.spec.normalfloat.NF4Weight` of ``W - tau`` plus the compressed tau.

    Extra attributes: ``tau`` (float32 per block: the searched value, before compression),
    ``tau_codes`` (uint8 per block), ``tau2`` (float32 per group of ``blocksize2`` blocks),
    ``blocksize2``.

    ``dequantize()``: ``float32(NF4 dequantized + DYNAMIC_MAP[tau_codes] * tau2)`` as float64.
    ``bits_per_weight``: the NF4 accounting + ``8/blocksize + 32/(blocksize * blocksize2)``.
    ``storage_bits``: the NF4 layout + 8 per tau code + 32 per ``tau2`` (``tau`` itself is not stored).
    Serialization adds tensors ``tau``, ``tau_codes``, ``tau2`` and meta ``blocksize2``.
    """

    tau: object = None
    tau_codes: object = None
    tau2: object = None
    blocksize2: int = 256

    def __post_init__(self):
        fmt = type(self).__name__
        _check_nf4_parts(self, fmt)
        if isinstance(self.blocksize2, bool) or not isinstance(self.blocksize2, (int, np.integer)) or self.blocksize2 < 1:
            raise ValueError(f"{fmt}: blocksize2 must be a positive integer; got {self.blocksize2!r}.")
        if self.numel % self.blocksize:
            raise ValueError(f"{fmt}: numel {self.numel} is not a multiple of blocksize {self.blocksize}.")
        for name, dtype, n in (("tau", np.float32, self.n_blocks), ("tau_codes", np.uint8, self.n_blocks),
                               ("tau2", np.float32, -(-self.n_blocks // self.blocksize2))):
            a = getattr(self, name)
            if not _dtype_is(a, np.dtype(dtype).name):
                raise ValueError(f"{fmt}: {name} must be a {np.dtype(dtype).name} array.")
            _check_shape(a, (n,), name, fmt)

    def tau_hat(self):
        """The decompressed tau per block (float32): ``DYNAMIC_MAP[tau_codes] * tau2[group]``."""
        xp = array_namespace(self.tau2)
        dev = _device(self.tau2)
        group = xp.arange(int(self.tau_codes.shape[0]), device=dev) // self.blocksize2
        return _lut(DYNAMIC_MAP, self.tau2)[xp.astype(self.tau_codes, xp.int64)] * self.tau2[group]

    def dequantize_fp32(self):
        xp = array_namespace(self.absmax)
        block = xp.arange(self.numel, device=_device(self.absmax)) // self.blocksize
        flat = xp.reshape(super().dequantize_fp32(), (-1,)) + self.tau_hat()[block]
        return xp.reshape(flat, self.shape)

    @property
    def bits_per_weight(self) -> float:
        return super().bits_per_weight + 8 / self.blocksize + FLOAT_BITS / (self.blocksize * self.blocksize2)

    @property
    def storage_bits(self) -> int:
        return super().storage_bits + 8 * self.n_blocks + FLOAT_BITS * int(self.tau2.shape[0])

    def _tensors_and_meta(self):
        tensors, meta = super()._tensors_and_meta()
        tensors.update({"tau": self.tau, "tau_codes": self.tau_codes, "tau2": self.tau2})
        return tensors, {**meta, "blocksize2": int(self.blocksize2)}

    @classmethod
    def _required_tensors(cls, meta):
        return NF4Weight._required_tensors(meta) + ("tau", "tau_codes", "tau2")

    @classmethod
    def _from_serialized(cls, tensors, meta, info):
        dq = meta.get("offset") is not None
        return cls(tensors["codes"], tensors["absmax"], blocksize=int(meta["blocksize"]),
                   absmax_codes=tensors["absmax_codes"] if dq else None,
                   absmax2=tensors["absmax2"] if dq else None, offset=float(meta["offset"]) if dq else None,
                   info=info, tau=tensors["tau"], tau_codes=tensors["tau_codes"], tau2=tensors["tau2"],
                   blocksize2=int(meta["blocksize2"]))


def icq(W, *, blocksize: int = 64, double_quant: bool = False, tau_range: float = 0.1, tau_n: int = 100,
        blocksize2: int = 256) -> ICQWeight:
    """Information Calibration Quantization (IR-QLoRA Sec. 3.2) of ``W`` (see the module docstring).

    Args:
        W: finite 2-D weight; ``W.size`` must be a multiple of ``blocksize``.
        blocksize: NF4 block size (64).
        double_quant: double-quantize the NF4 absmax (QLoRA's setting; the entropy search does not
            depend on it).
        tau_range: half-width of the factor grid in units of :data:`ICQ_SIGMA` (0.1; ``tau_lambda``).
        tau_n: ``2 * tau_n + 1`` candidates (100 in training; the original's MMLU evaluation uses 125).
        blocksize2: blocks per compressed-tau group (256).

    Returns:
        :class:`ICQWeight` (``.tau`` the searched float32 tau per block, ``info["factor"]`` the chosen
        float32 factor per block, ``info["entropy"]`` the mean chosen entropy).
    """
    blocksize, tau_range, tau_n, blocksize2 = check_icq_args(blocksize, tau_range, tau_n, blocksize2)
    flat = weight_fp32(W)
    if flat.shape[0] % blocksize:
        raise ValueError(f"icq: W has {flat.shape[0]} elements, not a multiple of blocksize {blocksize}; ICQ "
                         "shifts whole NF4 blocks (the original needs a multiple of blocksize * blocksize2). "
                         "Use a block size that divides the weight, or plain nf4.")
    shape = tuple(np.shape(W))
    blocks = flat.reshape(-1, blocksize)
    tau0 = lower_median(blocks)
    A = np.abs(blocks - tau0[:, None]).max(axis=1)
    table = entropy_table(blocksize)
    factors = icq_factors(tau_range, tau_n)
    best_f = best_ent = None
    for f in progress(factors, desc="icq search"):
        tau = (f * A) + tau0
        codes, _ = nf4_blockwise((blocks - tau[:, None]).reshape(-1), blocksize)
        ent = block_entropy(codes.reshape(-1, blocksize), table)
        if best_ent is None:
            best_f, best_ent = np.full_like(ent, f), ent
        else:
            best_f = np.where(ent > best_ent, f, best_f).astype(np.float32)
            best_ent = np.maximum(best_ent, ent)
    tau = (best_f * A) + tau0
    codes, absmax = nf4_blockwise((blocks - tau[:, None]).reshape(-1), blocksize)
    tau_codes, tau2 = compress_tau(tau, blocksize2)
    info = {"last_block_absmax": float(absmax[-1]), "factor": best_f, "entropy": float(best_ent.mean()),
            "tau_range": tau_range, "tau_n": tau_n}
    if double_quant:
        q, absmax2, offset = double_quantize(absmax)
        absmax, dq = double_dequantize(q, absmax2, offset), {"absmax_codes": q, "absmax2": absmax2, "offset": offset}
    else:
        dq = {}
    return ICQWeight(codes.reshape(shape), absmax, blocksize=blocksize, info=info, tau=tau.astype(np.float32),
                     tau_codes=tau_codes, tau2=tau2, blocksize2=blocksize2, **dq)
