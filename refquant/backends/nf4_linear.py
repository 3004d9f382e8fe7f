"""The NF4 linear layer of QLoRA and IR-QLoRA, and its LoRA adapters (peft), with IR-QLoRA's IEC.

:class:`NF4Linear` is a frozen 4-bit NormalFloat base layer: the weight is stored as NF4 codes (two
per byte, first element in the high nibble), the per-block absmax (with double quantization: its
8-bit codes and second-level constants, as :func:`refquant.backends.normalfloat_ops.torch_nf4_quantize`
returns them) and, for IR-QLoRA's Information Calibration Quantization (ICQ), the per-block shift
``tau`` (stored compressed, dequantized once). The forward pass dequantizes the weight in the
compute dtype and multiplies, as bitsandbytes' ``Linear4bit`` does (``x`` cast to the compute dtype,
``matmul_4bit``, the result cast back to the input dtype); the backward pass dequantizes again
instead of keeping the dequantized weight alive (bitsandbytes' ``MatMul4Bit`` keeps only the
quantized state, which is what makes QLoRA fit in memory).

:class:`NF4LoraLinear` is a peft LoRA layer for that base (registered through peft's custom-module
API, ``LoraConfig._register_custom_module``): peft builds ``lora_A``, ``lora_B``, the dropout and the
scaling ``alpha / r`` and handles adapters, trainable flags and state dicts. :class:`NF4IECLoraLinear`
adds IR-QLoRA's Information Elastic Connection (IEC) as the htqin/IR-QLoRA code does it
(``utils.py``, ``IRQLoraLinear4bit.forward``, commit e6fef4ac)::

    h   = A(dropout(x)) + beta_A * mean(x over r equal chunks of the input)      # x without dropout
    out = base(x) + (B(h) reshaped into r chunks + beta_B * h_j added to chunk j) * alpha / r

with two trainable scalars ``beta_A``, ``beta_B`` per adapter that start at 0 (so the layer starts as
plain LoRA); ``r`` must divide ``in_features`` and ``out_features``. IEC is a peft custom module, not
a peft ``LoraVariant``: the variant API is marked private and prone to change in peft, is selected
by flags of ``LoraConfig`` that IEC does not have, and the GPU machines carry peft as a plain folder,
so the layer depends only on the stable core of ``LoraLayer`` (``update_layer``, ``lora_A/B``,
``lora_dropout``, ``scaling``, ``active_adapters``). Its forward is written out here like the
original's.

Merging: an NF4 base cannot absorb a delta without being requantized (bitsandbytes' LoRA merge
dequantizes, adds and requantizes, which changes the base). :meth:`NF4LoraLinear.merged_linear`
returns a plain ``nn.Linear`` with ``dequantize(W) + delta`` (IEC included: the IEC path is linear
in ``x``, ``delta = s (B + beta_B E)(A + beta_A M)`` with ``M`` the chunk-mean and ``E`` the chunk
broadcast matrix), which is what a user merging QLoRA adapters into a 16/32-bit base gets.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..spec import normalfloat as nf_spec
from .normalfloat_ops import NF4Tensors, pack_nf4, torch_icq, torch_nf4_dequantize, torch_nf4_quantize, unpack_nf4

try:  # peft is optional for the NF4 base itself; the LoRA layers need it
    from peft.tuners.lora import LoraConfig, LoraLayer
except ImportError:  # pragma: no cover - exercised on machines without peft
    LoraConfig = None
    LoraLayer = None

__all__ = ["NF4Linear", "NF4LoraLinear", "NF4IECLoraLinear", "iec_check",
           "iec_delta_weight", "lora_config", "peft_available"]


def peft_available() -> bool:
    return LoraLayer is not None


class _NF4Matmul(torch.autograd.Function):
    """``x @ dequantize(W).T``: the backward dequantizes again rather than saving the weight."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return torch.nn.functional.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        W = ctx.layer.dequantize(grad_out.dtype)
        return grad_out @ W, None


class NF4Linear(nn.Module):
    """A frozen NF4 linear layer (bitsandbytes ``Linear4bit`` with ``quant_type="nf4"``).

    Build it with :meth:`from_linear`. Buffers: ``codes`` (packed two per byte,
    :func:`~refquant.backends.normalfloat_ops.pack_nf4`), ``absmax`` (float32 per block: the
    double-dequantized absmax under double quantization, computed once), the double-quantization
    tensors ``absmax_codes`` / ``absmax2`` (kept for the storage accounting and the saved checkpoint),
    ICQ's compressed tau ``tau_codes`` / ``tau2`` (IR-QLoRA), and ``bias``. ``compute_dtype`` is
    bitsandbytes' ``compute_dtype`` (QLoRA's and IR-QLoRA's Alpaca scripts run without ``--bf16``:
    float32).
    """

    _TENSORS = ("absmax", "absmax_codes", "absmax2", "tau_codes", "tau2")

    def __init__(self, q: NF4Tensors, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32,
                 info: dict | None = None):
        super().__init__()
        if not isinstance(q, NF4Tensors):
            raise TypeError(f"expected the NF4Tensors record of torch_nf4_quantize; got {type(q).__name__}.")
        shape = tuple(int(s) for s in q.shape)
        if len(shape) != 2:
            raise ValueError(f"an NF4 linear needs a 2-D weight (out_features, in_features); got shape {shape}.")
        self.out_features, self.in_features = shape
        self.compute_dtype = compute_dtype
        self.blocksize = int(q.blocksize)
        self.blocksize2 = q.blocksize2
        self.offset = q.offset
        self._numel = shape[0] * shape[1]
        self.register_buffer("codes", pack_nf4(q.codes))
        for name in self._TENSORS:
            v = getattr(q, name)
            self.register_buffer(name, None if v is None else v.detach().clone())
        self.info = dict(info or {})
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # derived, not saved: the code-pair table of a packed byte and ICQ's decompressed tau per block
        pairs = torch.tensor(np.stack([np.repeat(nf_spec.NF4_CODE, 16), np.tile(nf_spec.NF4_CODE, 16)], axis=1))
        self.register_buffer("_pairs", pairs.to(self.codes.device), persistent=False)
        tau_hat = None
        if self.tau_codes is not None:  # DYNAMIC_MAP[tau_codes] * tau2[group], float32 (as torch_nf4_dequantize)
            dmap = torch.tensor(np.array(nf_spec.DYNAMIC_MAP), device=self.tau_codes.device)
            g = torch.arange(self.tau_codes.shape[0], device=self.tau_codes.device) // int(self.blocksize2)
            tau_hat = dmap[self.tau_codes.to(torch.int64)] * self.tau2[g]
        self.register_buffer("_tau_hat", tau_hat, persistent=False)

    @property
    def icq(self) -> bool:
        return self.tau_codes is not None

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, icq: bool = False, tau_range: float = 0.1,
                    tau_n: int = 100, blocksize2: int = 256) -> "NF4Linear":
        """Quantize ``linear.weight`` to NF4 (``icq=True``: IR-QLoRA's ICQ) and wrap it."""
        W = linear.weight.detach()
        compute_dtype = compute_dtype or torch.float32
        if icq:
            q, _tau = torch_icq(W, blocksize=blocksize, double_quant=double_quant, tau_range=tau_range,
                                tau_n=tau_n, blocksize2=blocksize2)
            info = {"icq": {"tau_range": tau_range, "tau_n": tau_n, "blocksize2": blocksize2,
                            "entropy": q.info.get("entropy")}}
            return cls(q, linear.bias, compute_dtype, info)
        return cls(torch_nf4_quantize(W, blocksize=blocksize, double_quant=double_quant), linear.bias, compute_dtype)

    # -- the weight -----------------------------------------------------------------------------

    def nf4(self) -> NF4Tensors:
        """The NF4Tensors record (codes unpacked) that :func:`torch_nf4_dequantize` reads."""
        return NF4Tensors(unpack_nf4(self.codes, self._numel), self.absmax, (self.out_features, self.in_features),
                          self.blocksize, self.absmax_codes, self.absmax2, self.offset, None, self.tau_codes,
                          self.tau2, self.blocksize2)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight (out_features, in_features) in ``dtype`` (default: the compute dtype):
        ``float32(NF4[code] * absmax)`` (+ ICQ's decompressed tau of the block, a float32 sum), cast to
        ``dtype`` -- the arithmetic of :func:`torch_nf4_dequantize`, bit for bit, read straight from the
        packed bytes (one lookup of the two codes of a byte) instead of unpacking them first."""
        dtype = dtype or self.compute_dtype
        if self._numel % self.blocksize:  # a partial last block: the general routine
            return torch_nf4_dequantize(self.nf4(), dtype)
        W = self._pairs[self.codes.to(torch.int64)].reshape(-1, self.blocksize) * self.absmax[:, None]
        if self._tau_hat is not None:
            W = W + self._tau_hat[:, None]
        return W.reshape(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The packed uint8 codes, as bitsandbytes' ``Linear4bit.weight`` (a ``Params4bit`` of packed bytes):
        peft and transformers read its device and dtype; :meth:`dequantize` gives the matrix."""
        return self.codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        xc = x.to(self.compute_dtype)
        out = _NF4Matmul.apply(xc, self)
        if self.bias is not None:
            out = out + self.bias.to(self.compute_dtype)
        return out.to(inp_dtype)

    def storage_bits(self) -> int:
        """Bits of the stored format: packed codes, the (double-quantized) absmax, ICQ's tau."""
        n = self.codes.numel() * 8
        if self.absmax_codes is not None:
            n += self.absmax_codes.numel() * 8 + self.absmax2.numel() * 32 + 32
        else:
            n += self.absmax.numel() * 32
        if self.tau_codes is not None:
            n += self.tau_codes.numel() * 8 + self.tau2.numel() * 32
        return n

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={self.absmax_codes is not None}, icq={self.icq}, compute_dtype={self.compute_dtype}")


# -------------------------------------------------------------------------------------------------
# LoRA on the NF4 base (peft custom module) and IR-QLoRA's IEC


def iec_check(in_features: int, out_features: int, r: int) -> None:
    """IEC splits the input into r chunks and the output into r chunks: r must divide both."""
    bad = [f"{name}={n}" for name, n in (("in_features", in_features), ("out_features", out_features)) if n % r]
    if bad:
        raise ValueError(f"IEC (IR-QLoRA) needs the LoRA rank r={r} to divide in_features and out_features; "
                         f"{', '.join(bad)} is not a multiple of {r}. Choose an r that divides both.")


def _chunk_matrices(in_features: int, out_features: int, r: int, dtype, device):
    """``M`` (r, in): mean over r equal input chunks; ``E`` (out, r): chunk j of the output gets h_j."""
    M = torch.repeat_interleave(torch.eye(r, dtype=dtype, device=device), in_features // r, dim=1) / (in_features // r)
    E = torch.repeat_interleave(torch.eye(r, dtype=dtype, device=device), out_features // r, dim=0)
    return M, E


def iec_delta_weight(A: torch.Tensor, B: torch.Tensor, beta_A, beta_B, scaling: float) -> torch.Tensor:
    """The weight delta of an IEC adapter: ``scaling * (B + beta_B E) (A + beta_A M)`` (out, in)."""
    r, in_features = A.shape
    out_features = B.shape[0]
    iec_check(in_features, out_features, r)
    M, E = _chunk_matrices(in_features, out_features, r, A.dtype, A.device)
    return scaling * (B + beta_B * E) @ (A + beta_A * M)


if LoraLayer is not None:

    class NF4LoraLinear(nn.Module, LoraLayer):
        """peft LoRA on an :class:`NF4Linear` base (QLoRA: peft's ``Linear4bit`` on bitsandbytes' layer).

        ``out = base(x) + B(A(dropout(x))) * alpha / r``, the adapter in its own dtype (float32 as
        peft creates it) on ``x`` cast to that dtype, the sum in the base output's dtype.
        """

        def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer, **kwargs)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def lora_delta(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
            A, B = self.lora_A[adapter], self.lora_B[adapter]
            x = self._cast_input_dtype(x, A.weight.dtype)
            return B(A(self.lora_dropout[adapter](x))) * self.scaling[adapter]

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.disable_adapters:
                return self.base_layer(x)
            result = self.base_layer(x)
            torch_result_dtype = result.dtype
            for adapter in self.active_adapters:
                if adapter not in self.lora_A.keys():
                    continue
                result = result + self.lora_delta(x, adapter).to(torch_result_dtype)
            return result

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

        def merged_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
            """A plain ``nn.Linear`` holding ``dequantize(W) + delta`` of the active adapters (float32 sum)."""
            base = self.get_base_layer()
            W = base.dequantize(torch.float32)
            for adapter in self.active_adapters:
                if adapter in self.lora_A.keys():
                    W = W + self.get_delta_weight(adapter).float()
            lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=W.device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(W.to(dtype))
                if base.bias is not None:
                    lin.bias.copy_(base.bias.to(dtype))
            lin.requires_grad_(False)
            return lin

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise ValueError("an NF4 base cannot absorb the LoRA delta without requantization; use "
                             "merged_linear() (or refquant.finetune.merge_adapters(model)) to get a float layer "
                             "with the adapters merged.")

        def unmerge(self) -> None:
            raise ValueError("NF4 LoRA layers are never merged in place; nothing to unmerge.")

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    class NF4IECLoraLinear(NF4LoraLinear):
        """IR-QLoRA: LoRA with the Information Elastic Connection (two scalars per adapter, start 0)."""

        adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_iec_beta_A", "lora_iec_beta_B")

        def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            iec_check(base_layer.in_features, base_layer.out_features, r)
            nn.Module.__init__(self)
            self.lora_iec_beta_A = nn.ParameterDict({})
            self.lora_iec_beta_B = nn.ParameterDict({})
            LoraLayer.__init__(self, base_layer, **kwargs)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
            iec_check(self.in_features, self.out_features, r)
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
            A = self.lora_A[adapter_name].weight
            # the original: torch.zeros([1], dtype=lora_A's dtype) on the base layer's device
            self.lora_iec_beta_A[adapter_name] = nn.Parameter(torch.zeros(1, dtype=A.dtype, device=A.device))
            self.lora_iec_beta_B[adapter_name] = nn.Parameter(torch.zeros(1, dtype=A.dtype, device=A.device))
            self.set_adapter(self.active_adapters)

        def lora_delta(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
            A, B = self.lora_A[adapter], self.lora_B[adapter]
            r = self.r[adapter]
            x = self._cast_input_dtype(x, A.weight.dtype)
            # h = A(dropout(x)) + beta_A * (mean of x over r equal chunks); x here without dropout
            h = A(self.lora_dropout[adapter](x)) + self.lora_iec_beta_A[adapter] * x.reshape(*x.shape[:-1], r, -1).mean(-1)
            # B(h) in r chunks, chunk j shifted by beta_B * h_j
            y = (B(h).reshape(*h.shape, -1) + self.lora_iec_beta_B[adapter] * h.unsqueeze(-1)).reshape(*h.shape[:-1], -1)
            return y * self.scaling[adapter]

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            return iec_delta_weight(self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                    self.lora_iec_beta_A[adapter], self.lora_iec_beta_B[adapter],
                                    self.scaling[adapter])

else:  # pragma: no cover
    NF4LoraLinear = NF4IECLoraLinear = None


def lora_config(target_modules, r: int = 64, lora_alpha: float = 16, lora_dropout: float = 0.0, iec: bool = False):
    """A peft ``LoraConfig`` (bias "none", as QLoRA's) with the NF4 LoRA layer registered for :class:`NF4Linear`."""
    if LoraConfig is None:
        raise ImportError("LoRA adapters need peft: pip install peft (or put a peft folder on PYTHONPATH).")
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=lora_dropout,
                     bias="none")
    cfg._register_custom_module({NF4Linear: NF4IECLoraLinear if iec else NF4LoraLinear})
    return cfg
