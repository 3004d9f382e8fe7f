"""ICQ's wiring unit (``--method icq``): IR-QLoRA's Information Calibration Quantization alone, as a PTQ
(``refquant/spec/icq.py``): every linear to NF4 of ``W - tau`` with the entropy-maximizing per-block
``tau``, no finetuning (the finetuning track builds on the same twin).

Golden suite ``icq``: 8 cases (3 input shapes; blocksize 64, or 32 where 64 does not divide the
weight; double quantization off/on; the default grid ``tau_n = 100`` and a coarse ``tau_n = 10``),
identical bit for bit on every backend (float32 elementwise steps, the entropy from the reference's
table of float32 terms summed in code order).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..golden import GoldenSuite
from ..pipeline import Method, Options, QuantConfig, register
from ..spec import llama
from ..spec.normalfloat import BLOCKSIZES
from ..spec.quantizer import QuantSpec
from .nf4 import NF4OpsForPipeline, PARITY_RULE as NF4_PARITY_RULE, check_4bit, compare_outputs, nf4_outputs, rule_keys


@dataclass(frozen=True)
class ICQOptions(Options):
    """ICQ settings; defaults of htqin/IR-QLoRA (``irlora.py`` dataclass: ``tau_lambda`` 0.1, ``tau_n``
    100, ``blocksize2`` 256; NF4 with double quantization as in its QLoRA setup)."""

    nf4_blocksize: int = field(default=64, metadata={"help": "weights per NF4 block / tau (bitsandbytes: 64)"})
    double_quant: bool = field(default=True, metadata={"help": "double-quantize the NF4 absmax (IR-QLoRA: on)"})
    tau_range: float = field(default=0.1, metadata={"help": "half-width of the tau factor grid, in units of sigma"})
    tau_n: int = field(default=100, metadata={"help": "2*tau_n+1 candidates (the original's MMLU eval uses 125)"})
    blocksize2: int = field(default=256, metadata={"help": "blocks per group of the compressed tau"})

    def __post_init__(self):
        if isinstance(self.nf4_blocksize, bool) or self.nf4_blocksize not in BLOCKSIZES:
            raise ValueError(f"nf4_blocksize must be one of {BLOCKSIZES}; got {self.nf4_blocksize!r}.")
        if not (isinstance(self.tau_range, (int, float)) and math.isfinite(self.tau_range) and self.tau_range >= 0):
            raise ValueError(f"tau_range must be a finite number >= 0; got {self.tau_range!r}.")
        if isinstance(self.tau_n, bool) or not isinstance(self.tau_n, int) or self.tau_n < 0:
            raise ValueError(f"tau_n must be an integer >= 0; got {self.tau_n!r}.")
        if isinstance(self.blocksize2, bool) or not isinstance(self.blocksize2, int) or self.blocksize2 < 1:
            raise ValueError(f"blocksize2 must be a positive integer; got {self.blocksize2!r}.")


# --------------------------------------------------------------------------------------------- golden


def golden_cases():
    for shape, blocksize in (("llama4096", 64), ("nasty256", 64), ("odd1000", 32)):
        for dq in (False, True):
            params = {"blocksize": blocksize, "double_quant": dq, "tau_range": 0.1, "tau_n": 100, "blocksize2": 256}
            yield shape, f"{shape}_b{blocksize}{'_dq' if dq else ''}_n100", params, False
    for shape in ("llama4096", "nasty256"):
        params = {"blocksize": 64, "double_quant": False, "tau_range": 0.1, "tau_n": 10, "blocksize2": 128}
        yield shape, f"{shape}_b64_n10_g128", params, False


def golden_rule(params: dict) -> dict:
    exact, bitwise = rule_keys(params, tau=True)
    return {"exact": exact, "bitwise": bitwise, "bitwise_everywhere": True, "cross_platform_rtol": 0.0,
            "text": "float32 elementwise IEEE steps, the kernel's constants, an entropy table of float32-rounded "
                    "terms (float64 log2 rounded to float32): identical bit for bit on every platform"}


PARITY_RULE = dict(NF4_PARITY_RULE, text="codes, tau codes identical; tau, tau2, absmax(2), offset and the float32 "
                   "dequantized weight bit-identical (the entropy search uses the reference's float32 term table "
                   "summed in the same order, so ties resolve identically)")


def golden_run(params, arrays, ops, to_device, to_numpy) -> dict:
    return nf4_outputs(ops.icq(to_device(arrays["W"]), **params), to_numpy)


def golden_compare(case, arrays, expected, got, rule) -> dict:
    return compare_outputs(case.params, expected, got, rule, tau=True)


# --------------------------------------------------------------------------------------------- the method


@register
class ICQ(Method):
    """IR-QLoRA's ICQ (:func:`refquant.icq`) of every linear, without finetuning; no calibration."""

    name = "icq"
    Options = ICQOptions
    ops = NF4OpsForPipeline
    needs_calibration = False
    golden = (GoldenSuite("icq", golden_cases, golden_rule, PARITY_RULE, golden_run, golden_compare),)
    preflight = ("icq", "nf4")
    bench_preset = {"wbits": 4, "group_size": None, "double_quant": True}
    bench_default = False
    suites = ("lora_ft",)

    def validate(self, config) -> None:
        check_4bit(config, "icq")

    def weight_spec(self, config) -> QuantSpec:
        """4-bit; NF4's block absmax is not a uniform grid (``group_size`` / ``sym`` do not apply)."""
        return QuantSpec(bits=4, group_size=None, sym=True)

    def study_rows(self, suite: str) -> list:
        """LoRA-finetuning track: ICQ alone (IR-QLoRA's quantizer without its finetuning), 4 bits."""
        if suite != "lora_ft":
            return []
        return [("icq_w4", "ICQ (IR-QLoRA quantizer, no FT)", QuantConfig.of("icq", wbits=4, group_size=None))]

    def quantize_layer(self, ctx) -> None:
        o = ctx.config.options
        for name in llama.LINEARS:
            ctx.set_quantized(name, ctx.ops.icq(ctx.get(name), blocksize=o.nf4_blocksize, double_quant=o.double_quant,
                                                tau_range=o.tau_range, tau_n=o.tau_n, blocksize2=o.blocksize2))


__all__ = ["ICQ", "ICQOptions"]
