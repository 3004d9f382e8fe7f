"""NormalFloat's wiring unit (``--method nf4``): every linear to bitsandbytes' NF4 (``refquant/spec/normalfloat.py``).

The study's "NormalFloat" 4-bit row (Table 3: NF4 without finetuning). No calibration. The twin is
the backends' :class:`~refquant.backends.protocols.NormalFloatOps` (``refquant/backends/normalfloat_ops.py``).

Golden suite ``nf4``: 18 cases (3 input shapes x blocksize 64/128/32 x double quantization off/on),
identical bit for bit on every platform and backend (float32 elementwise IEEE steps, the kernel's
thresholds; the one reduction, the double-quantization mean, is exact).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..backends.protocols import NormalFloatOps, QuantOps
from ..golden import GoldenSuite
from ..pipeline import Method, Options, QuantConfig, register
from ..spec import llama
from ..spec.normalfloat import BLOCKSIZES
from ..spec.quantizer import QuantSpec

SHAPES = ("llama4096", "odd1000", "nasty256")


@dataclass(frozen=True)
class NF4Options(Options):
    """NF4 settings; defaults of QLoRA's code (artidoro/qlora ``qlora.py``: ``--double_quant`` True,
    bitsandbytes blocksize 64)."""

    nf4_blocksize: int = field(default=64, metadata={"help": "weights per absmax block (bitsandbytes: 64)"})
    double_quant: bool = field(default=True, metadata={
        "help": "double-quantize the block absmax (QLoRA's --double_quant, default on)"})

    def __post_init__(self):
        if isinstance(self.nf4_blocksize, bool) or self.nf4_blocksize not in BLOCKSIZES:
            raise ValueError(f"nf4_blocksize must be one of {BLOCKSIZES}; got {self.nf4_blocksize!r}.")


@runtime_checkable
class NF4OpsForPipeline(NormalFloatOps, QuantOps, Protocol):
    """What the layer-level NF4 / ICQ call."""


def check_4bit(config: QuantConfig, name: str) -> None:
    if config.wbits != 4:
        raise ValueError(f"{name} is a 4-bit format (NormalFloat-4); got --wbits {config.wbits}. Use --wbits 4.")
    if config.abits != 16:
        raise ValueError(f"{name} quantizes weights only; got --abits {config.abits}. Use --abits 16.")


# --------------------------------------------------------------------------------------------- golden


def nf4_outputs(qw, to_numpy) -> dict:
    """The arrays an NF4 / ICQ weight is compared on (``W_hat_fp32``: the float32 dequantization)."""
    out = {"codes": to_numpy(qw.codes), "absmax": to_numpy(qw.absmax), "W_hat_fp32": to_numpy(qw.dequantize_fp32())}
    if qw.double_quant:
        out.update({"absmax_codes": to_numpy(qw.absmax_codes), "absmax2": to_numpy(qw.absmax2),
                    "offset": np.asarray(qw.offset, dtype=np.float64)})
    for key in ("tau", "tau_codes", "tau2"):
        if getattr(qw, key, None) is not None:
            out[key] = to_numpy(getattr(qw, key))
    return out


def golden_cases():
    for shape in SHAPES:
        for blocksize, dq in itertools.product((64, 128, 32), (False, True)):
            yield shape, f"{shape}_b{blocksize}{'_dq' if dq else ''}", {"blocksize": blocksize, "double_quant": dq}, False


def rule_keys(params: dict, tau: bool = False) -> tuple[list, list]:
    """(exact keys, bitwise keys) of a case's outputs."""
    dq = bool(params.get("double_quant"))
    exact = ["codes"] + (["absmax_codes"] if dq else []) + (["tau_codes"] if tau else [])
    bitwise = ["absmax", "W_hat_fp32"] + (["absmax2", "offset"] if dq else []) + (["tau", "tau2"] if tau else [])
    return exact, bitwise


def golden_rule(params: dict) -> dict:
    exact, bitwise = rule_keys(params)
    return {"exact": exact, "bitwise": bitwise, "bitwise_everywhere": True, "cross_platform_rtol": 0.0,
            "text": "float32 elementwise IEEE steps with the kernel's constants and an exact mean: identical bit "
                    "for bit on every platform"}


PARITY_RULE = {
    "max_differing": 0,
    "text": "codes (and double-quantization codes) identical; absmax, absmax2, offset and the float32 "
            "dequantized weight bit-identical: every step is one IEEE float32 operation on both sides "
            "(no reduction whose order matters; the offset's mean is summed in float64 and rounded once)",
}


def golden_run(params, arrays, ops, to_device, to_numpy) -> dict:
    return nf4_outputs(ops.nf4(to_device(arrays["W"]), **params), to_numpy)


def n_differing(e, g) -> int:
    """Elements of ``g`` that differ from ``e``: by value for integers, by bit pattern for floats."""
    e = np.ascontiguousarray(e)
    g = np.ascontiguousarray(np.asarray(g).astype(e.dtype))
    if e.dtype.kind in "iub":
        return int((e != g).sum())
    return int((e.view(f"u{e.dtype.itemsize}") != g.view(f"u{e.dtype.itemsize}")).sum())


def compare_outputs(params, expected, got, rule, tau: bool = False) -> dict:
    report, bad = {}, 0
    exact, bitwise = rule_keys(params, tau)
    for key in exact + bitwise:
        if key not in got or np.shape(got[key]) != np.shape(expected[key]):
            report[f"{key}_problem"] = "missing" if key not in got else f"shape {np.shape(got[key])}"
            bad += 1
            continue
        n = n_differing(expected[key], got[key])
        report[f"{key}_differing"] = n
        bad += n
    report["ok"] = bad <= rule["max_differing"]
    return report


def golden_compare(case, arrays, expected, got, rule) -> dict:
    return compare_outputs(case.params, expected, got, rule)


# --------------------------------------------------------------------------------------------- the method


@register
class NF4(Method):
    """NormalFloat-4 of every linear (:func:`refquant.nf4`), the study's "NormalFloat" row; no calibration."""

    name = "nf4"
    Options = NF4Options
    ops = NF4OpsForPipeline
    needs_calibration = False
    golden = (GoldenSuite("nf4", golden_cases, golden_rule, PARITY_RULE, golden_run, golden_compare),)
    preflight = ("nf4",)
    bench_preset = {"wbits": 4, "group_size": None, "double_quant": True}
    bench_default = False
    suites = ("lora_ft",)

    def validate(self, config) -> None:
        check_4bit(config, "nf4")

    def weight_spec(self, config) -> QuantSpec:
        """4-bit; NF4's block absmax is not a uniform grid (``group_size`` / ``sym`` do not apply)."""
        return QuantSpec(bits=4, group_size=None, sym=True)

    def study_rows(self, suite: str) -> list:
        """LoRA-finetuning track (the study's Table 3): NormalFloat alone at 4 bits (double quantization on)."""
        if suite != "lora_ft":
            return []
        return [("nf4_w4", "NormalFloat", QuantConfig.of("nf4", wbits=4, group_size=None, double_quant=True))]

    def quantize_layer(self, ctx) -> None:
        opts = ctx.config.options
        for name in llama.LINEARS:
            ctx.set_quantized(name, ctx.ops.nf4(ctx.get(name), blocksize=opts.nf4_blocksize,
                                                double_quant=opts.double_quant))


__all__ = ["NF4", "NF4Options", "NF4OpsForPipeline", "nf4_outputs", "check_4bit"]
