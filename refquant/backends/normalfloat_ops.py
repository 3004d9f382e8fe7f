"""NF4 (bitsandbytes' CUDA kernel) and IR-QLoRA's ICQ in torch: the twins of :mod:`refquant.spec.normalfloat`
and :mod:`refquant.spec.icq`, on any device.

Every step is the reference's float32 step as one IEEE torch operation (max of ``abs``, ``1.0 / absmax``,
one product, comparisons with the kernel's float32 thresholds via ``torch.bucketize``, the dynamic
map's binary search, a float32 product and sum for dequantization), so codes, absmax and the
dequantized values are bit-identical to the reference on CPU and CUDA. The one reduction whose order
could matter, the double-quantization offset (mean of the absmaxes), is summed in float64 and rounded
once, as the reference does exactly (:func:`math.fsum`): they agree unless the float32 rounding of
the mean sits within ~1e-16 (relative) of a tie. The ICQ entropy uses the reference's table of
float32 terms summed in code order (:func:`refquant.spec.icq.entropy_table`).

Public functions (the finetuning code builds on them):

* :func:`torch_nf4_quantize` ``(W, blocksize=64, double_quant=False) -> NF4Tensors``;
* :func:`torch_nf4_dequantize` ``(q, dtype=torch.float32) -> Tensor`` (shape of W);
* :func:`torch_icq` ``(W, blocksize=64, double_quant=False, tau_range=0.1, tau_n=100, blocksize2=256)
  -> (NF4Tensors, tau)`` (``tau`` the searched float32 tau per block; the compressed tau is in the
  ``NF4Tensors``' ``tau_codes`` / ``tau2`` and :func:`torch_nf4_dequantize` adds it);
* :func:`pack_nf4` / :func:`unpack_nf4` (two codes per byte, the first element in the high nibble).

:class:`TorchNormalFloatOps` is the mixin of the torch backend (protocol
:class:`~refquant.backends.protocols.NormalFloatOps`): ``nf4`` / ``icq`` returning the spec's weight
objects (:class:`~refquant.spec.normalfloat.NF4Weight`, :class:`~refquant.spec.icq.ICQWeight`) with
host arrays. :class:`NumpyNormalFloatOps` is the numpy backend's mixin (the reference itself).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..spec import icq as icq_spec
from ..spec import normalfloat as nf_spec
from ..spec._checks import check_finite
from ..spec.progress import progress

try:
    import torch
except ImportError:  # pragma: no cover - the numpy mixin works without torch
    torch = None

__all__ = ["NF4Tensors", "torch_nf4_quantize", "torch_nf4_dequantize", "torch_icq", "pack_nf4", "unpack_nf4",
           "nf4_codes", "dynamic_quantize", "TorchNormalFloatOps", "NumpyNormalFloatOps"]


@dataclass
class NF4Tensors:
    """An NF4-quantized tensor on a torch device.

    Attributes:
        codes: uint8 (numel,), one code per element, row-major.
        absmax: float32 (n_blocks,): the absmax dequantization uses (double-dequantized under double
            quantization).
        shape: the original shape.
        blocksize: elements per block.
        absmax_codes, absmax2, offset: double quantization (uint8 (n_blocks,), float32
            (ceil(n_blocks/256),), Python float) or None.
        absmax_exact: float32 (n_blocks,): the first-level absmax before double quantization.
        tau_codes, tau2, blocksize2: ICQ's compressed tau (uint8 (n_blocks,), float32
            (ceil(n_blocks/blocksize2),)) or None; dequantization adds ``DYNAMIC_MAP[tau_codes] * tau2``.
    """

    codes: object
    absmax: object
    shape: tuple
    blocksize: int = 64
    absmax_codes: object = None
    absmax2: object = None
    offset: float | None = None
    absmax_exact: object = None
    tau_codes: object = None
    tau2: object = None
    blocksize2: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def device(self):
        return self.codes.device

    def to(self, device) -> "NF4Tensors":
        """A copy with every tensor on ``device``."""
        mv = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return NF4Tensors(mv(self.codes), mv(self.absmax), tuple(self.shape), self.blocksize, mv(self.absmax_codes),
                          mv(self.absmax2), self.offset, mv(self.absmax_exact), mv(self.tau_codes), mv(self.tau2),
                          self.blocksize2, dict(self.info))

    def packed(self):
        """The stored bytes (:func:`pack_nf4`; the pad nibble of an odd count as the kernel writes it)."""
        last = self.absmax_exact if self.absmax_exact is not None else self.absmax
        return pack_nf4(self.codes, pad=0 if float(last[-1]) == 0.0 else nf_spec.ZERO_CODE)


def _require_torch():
    if torch is None:  # pragma: no cover
        from . import BackendUnavailable

        raise BackendUnavailable("refquant.backends.normalfloat_ops needs PyTorch: pip install torch.")


def _table(a: np.ndarray, device):
    return torch.tensor(np.array(a), device=device)


def _weight_fp32(W, name: str = "W"):
    _require_torch()
    if not isinstance(W, torch.Tensor):
        W = torch.as_tensor(np.asarray(W))
    if W.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(W.shape)}); nothing to quantize.")
    if not W.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got {W.dtype}.")
    check_finite(W, name)
    W32 = W.detach().to(torch.float32)
    if not bool(torch.isfinite(W32).all()):
        raise ValueError(f"{name} has values beyond the float32 range (|W| > 3.4e38); NF4 stores float32 absmax.")
    return W32.reshape(-1).contiguous()


def nf4_codes(x):
    """:func:`refquant.spec.normalfloat.nf4_codes` in torch: count of thresholds strictly below ``x``; NaN -> 0."""
    T = _table(nf_spec.NF4_THRESHOLDS, x.device)
    codes = torch.bucketize(x, T, right=False, out_int32=True).to(torch.uint8)
    return torch.where(torch.isnan(x), torch.zeros_like(codes), codes)


def _pad_blocks(flat, blocksize: int):
    n = flat.shape[0]
    n_blocks = -(-n // blocksize)
    if n_blocks * blocksize != n:
        flat = torch.cat([flat, flat.new_zeros(n_blocks * blocksize - n)])
    return flat.reshape(n_blocks, blocksize)


def _nf4_blockwise(flat, blocksize: int):
    """(codes uint8 (n,), absmax float32 (n_blocks,)) as ``kQuantizeBlockwise``."""
    n = flat.shape[0]
    B = _pad_blocks(flat, blocksize)
    absmax = B.abs().amax(dim=1)
    r = 1.0 / absmax
    x = B * r[:, None]
    return nf4_codes(x).reshape(-1)[:n], absmax


def dynamic_quantize(y):
    """:func:`refquant.spec.normalfloat.dynamic_quantize` (``dQuantize<0>``) in torch: float32 -> uint8."""
    code = _table(nf_spec.DYNAMIC_MAP, y.device)
    pivot = torch.full(y.shape, 127, dtype=torch.int64, device=y.device)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full(y.shape, -1.0, dtype=torch.float32, device=y.device)
    upper = torch.full_like(lower, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        gt = y > val
        lower_pivot = torch.where(gt, pivot, lower_pivot)
        lower = torch.where(gt, val, lower)
        upper_pivot = torch.where(gt, upper_pivot, pivot)
        upper = torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code[pivot]
        step >>= 1
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    gt = y > val
    mid_up = (upper + val) * 0.5
    mid_lo = (lower + val) * 0.5
    q = torch.where(gt, torch.where(y > mid_up, upper_pivot, pivot), torch.where(y < mid_lo, lower_pivot, pivot))
    return q.to(torch.uint8)


def _double_quantize(absmax):
    offset = float(np.float32(float(absmax.to(torch.float64).sum()) / absmax.shape[0]))
    a = absmax - torch.tensor(offset, dtype=torch.float32, device=absmax.device)
    n = a.shape[0]
    B = _pad_blocks(a, nf_spec.DQ_BLOCKSIZE)
    absmax2 = B.abs().amax(dim=1)
    y = B * (1.0 / absmax2)[:, None]
    return dynamic_quantize(y).reshape(-1)[:n], absmax2, offset


def _double_dequantize(q, absmax2, offset):
    code = _table(nf_spec.DYNAMIC_MAP, q.device)
    block = torch.arange(q.shape[0], device=q.device) // nf_spec.DQ_BLOCKSIZE
    return code[q.to(torch.int64)] * absmax2[block] + torch.tensor(offset, dtype=torch.float32, device=q.device)


def _finish(codes, absmax, shape, blocksize, double_quant, **extra) -> NF4Tensors:
    if not double_quant:
        return NF4Tensors(codes, absmax, tuple(shape), blocksize, absmax_exact=absmax, **extra)
    q, absmax2, offset = _double_quantize(absmax)
    return NF4Tensors(codes, _double_dequantize(q, absmax2, offset), tuple(shape), blocksize, q, absmax2, offset,
                      absmax_exact=absmax, **extra)


def torch_nf4_quantize(W, blocksize: int = 64, double_quant: bool = False) -> NF4Tensors:
    """:func:`refquant.nf4` in torch on ``W``'s device (any shape; blocks over the row-major flattening)."""
    blocksize = nf_spec.check_blocksize(blocksize)
    _require_torch()
    with torch.no_grad():
        flat = _weight_fp32(W)
        codes, absmax = _nf4_blockwise(flat, blocksize)
        return _finish(codes, absmax, tuple(W.shape) if hasattr(W, "shape") else flat.shape, blocksize, double_quant)


def torch_nf4_dequantize(q: NF4Tensors, dtype=None):
    """``float32(NF4_CODE[codes] * absmax[block])`` (+ ``DYNAMIC_MAP[tau_codes] * tau2`` for ICQ), cast to
    ``dtype`` (float32 by default), shape ``q.shape``."""
    _require_torch()
    dtype = dtype or torch.float32
    with torch.no_grad():
        dev = q.codes.device
        n = q.codes.shape[0]
        block = torch.arange(n, device=dev) // q.blocksize
        out = _table(nf_spec.NF4_CODE, dev)[q.codes.to(torch.int64)] * q.absmax[block]
        if q.tau_codes is not None:
            out = out + _tau_hat(q.tau_codes, q.tau2, q.blocksize2)[block]
        return out.reshape(q.shape).to(dtype)


def _tau_hat(tau_codes, tau2, blocksize2):
    code = _table(nf_spec.DYNAMIC_MAP, tau_codes.device)
    g = torch.arange(tau_codes.shape[0], device=tau_codes.device) // blocksize2
    return code[tau_codes.to(torch.int64)] * tau2[g]


def _compress_tau(tau, blocksize2: int):
    n = tau.shape[0]
    tau2 = _pad_blocks(tau, blocksize2).abs().amax(dim=1)
    y = tau / tau2[torch.arange(n, device=tau.device) // blocksize2]
    code = _table(nf_spec.DYNAMIC_MAP, tau.device)
    codes = torch.empty(n, dtype=torch.uint8, device=tau.device)
    chunk = 1 << 16
    for s in range(0, n, chunk):
        codes[s:s + chunk] = torch.argmin((y[s:s + chunk, None] - code[None, :]).abs(), dim=1).to(torch.uint8)
    return torch.where(torch.isnan(y), torch.zeros_like(codes), codes), tau2


def _block_entropy(codes_blocks, table):
    n_blocks = codes_blocks.shape[0]
    counts = torch.zeros((n_blocks, 16), dtype=torch.int64, device=codes_blocks.device)
    counts.scatter_add_(1, codes_blocks.to(torch.int64), torch.ones_like(codes_blocks, dtype=torch.int64))
    terms = table[counts]
    ent = terms[:, 0].clone()
    for c in range(1, 16):
        ent = ent + terms[:, c]
    return ent


def torch_icq(W, blocksize: int = 64, double_quant: bool = False, tau_range: float = 0.1, tau_n: int = 100,
              blocksize2: int = 256):
    """:func:`refquant.icq` in torch: ``(NF4Tensors of W - tau* with the compressed tau, tau* float32 per block)``."""
    blocksize, tau_range, tau_n, blocksize2 = icq_spec.check_icq_args(blocksize, tau_range, tau_n, blocksize2)
    _require_torch()
    with torch.no_grad():
        flat = _weight_fp32(W)
        if flat.shape[0] % blocksize:
            raise ValueError(f"icq: W has {flat.shape[0]} elements, not a multiple of blocksize {blocksize}; ICQ "
                             "shifts whole NF4 blocks. Use a block size that divides the weight, or plain nf4.")
        dev = flat.device
        blocks = flat.reshape(-1, blocksize)
        tau0 = blocks.sort(dim=1).values[:, (blocksize - 1) // 2]
        A = (blocks - tau0[:, None]).abs().amax(dim=1)
        table = _table(icq_spec.entropy_table(blocksize), dev)
        factors = icq_spec.icq_factors(tau_range, tau_n)
        T = _table(nf_spec.NF4_THRESHOLDS, dev)
        best_f = best_ent = None
        for f in progress(factors.tolist(), desc="icq search"):
            fv = torch.tensor(f, dtype=torch.float32, device=dev)
            tau = fv * A + tau0
            Wt = blocks - tau[:, None]
            x = Wt * (1.0 / Wt.abs().amax(dim=1))[:, None]
            codes = torch.bucketize(x, T, right=False, out_int32=True)
            codes = torch.where(torch.isnan(x), torch.zeros_like(codes), codes)
            ent = _block_entropy(codes, table)
            if best_ent is None:
                best_f, best_ent = torch.full_like(ent, f), ent
            else:
                best_f = torch.where(ent > best_ent, fv, best_f)
                best_ent = torch.maximum(best_ent, ent)
        tau = best_f * A + tau0
        codes, absmax = _nf4_blockwise((blocks - tau[:, None]).reshape(-1), blocksize)
        tau_codes, tau2 = _compress_tau(tau, blocksize2)
        shape = tuple(W.shape) if hasattr(W, "shape") else (flat.shape[0],)
        q = _finish(codes, absmax, shape, blocksize, double_quant, tau_codes=tau_codes, tau2=tau2,
                    blocksize2=blocksize2)
        q.info.update({"factor": best_f, "entropy": float(best_ent.to(torch.float64).mean())})
        return q, tau


def pack_nf4(codes, pad: int = nf_spec.ZERO_CODE):
    """Two codes per byte, the first element in the high nibble; an odd count pads the last low nibble."""
    _require_torch()
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_full((1,), int(pad))])
    return (c[0::2] << 4) | c[1::2]


def unpack_nf4(packed, numel: int | None = None):
    """Inverse of :func:`pack_nf4`: uint8 codes (``2 * len(packed)``, or the first ``numel``)."""
    _require_torch()
    p = packed.reshape(-1).to(torch.uint8)
    out = torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)
    return out if numel is None else out[:numel]


# ------------------------------------------------------------------------------------------ backend mixins


def to_weight(q: NF4Tensors):
    """The spec's weight object (:class:`NF4Weight` / :class:`ICQWeight`, tensors on their device) of a 2-D
    ``NF4Tensors`` (``to_tensors()`` copies them to the host)."""
    if len(q.shape) != 2:
        raise ValueError(f"to_weight: the weight formats are 2-D (out_features, in_features); got shape {q.shape}.")
    dq = {}
    if q.double_quant:
        dq = {"absmax_codes": q.absmax_codes, "absmax2": q.absmax2, "offset": float(q.offset)}
    info = {"last_block_absmax": float(q.absmax_exact[-1])}
    codes = q.codes.reshape(q.shape)
    if q.tau_codes is None:
        return nf_spec.NF4Weight(codes, q.absmax, blocksize=q.blocksize, info=info, **dq)
    info["entropy"] = q.info.get("entropy")
    info["factor"] = q.info.get("factor")
    return icq_spec.ICQWeight(codes, q.absmax, blocksize=q.blocksize, info=info, tau=q.info.get("tau"),
                              tau_codes=q.tau_codes, tau2=q.tau2, blocksize2=q.blocksize2, **dq)


class TorchNormalFloatOps:
    """:class:`~refquant.backends.protocols.NormalFloatOps` in torch (float32 as the kernel, bit-identical)."""

    def nf4(self, W, *, blocksize: int = 64, double_quant: bool = False):
        if not hasattr(W, "ndim") or W.ndim != 2:
            raise ValueError(f"W must be a 2-D weight (out_features, in_features); got {getattr(W, 'shape', W)}.")
        return to_weight(torch_nf4_quantize(W, blocksize=blocksize, double_quant=double_quant))

    def icq(self, W, *, blocksize: int = 64, double_quant: bool = False, tau_range: float = 0.1, tau_n: int = 100,
            blocksize2: int = 256):
        if not hasattr(W, "ndim") or W.ndim != 2:
            raise ValueError(f"W must be a 2-D weight (out_features, in_features); got {getattr(W, 'shape', W)}.")
        q, tau = torch_icq(W, blocksize=blocksize, double_quant=double_quant, tau_range=tau_range, tau_n=tau_n,
                           blocksize2=blocksize2)
        q.info["tau"] = tau
        return to_weight(q)


class NumpyNormalFloatOps:
    """:class:`~refquant.backends.protocols.NormalFloatOps`: :func:`refquant.nf4` / :func:`refquant.icq` themselves."""

    def nf4(self, W, *, blocksize: int = 64, double_quant: bool = False):
        return nf_spec.nf4(_as_np(W), blocksize=blocksize, double_quant=double_quant)

    def icq(self, W, *, blocksize: int = 64, double_quant: bool = False, tau_range: float = 0.1, tau_n: int = 100,
            blocksize2: int = 256):
        return icq_spec.icq(_as_np(W), blocksize=blocksize, double_quant=double_quant, tau_range=tau_range,
                            tau_n=tau_n, blocksize2=blocksize2)


def _as_np(W):
    if torch is not None and isinstance(W, torch.Tensor):
        W = W.detach().cpu()
        return (W.float() if W.dtype in (torch.bfloat16, torch.float16) else W).numpy()
    return np.asarray(W)

