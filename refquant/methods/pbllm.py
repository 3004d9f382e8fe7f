"""PB-LLM's wiring unit: options (the authors' defaults), the layer-level method, golden suite, presets, study rows.

The spec is ``refquant/spec/pbllm.py`` (shared binarization primitives in ``refquant/spec/binarize.py``);
the twins are the backends' :class:`~refquant.backends.protocols.BinarizationOps`. Hessians come from
the layer's (partially quantized) inputs, as GPTQ's; q/k/v and gate/up share theirs
(``ops.pbllm_shared``: one factorization, thresholds and binarizer statistics per matrix).

PB-LLM binarizes: the shared ``--wbits`` must be 1 (the binarized part); ``--group-size`` is PB-LLM's
threshold/binarizer group (``-1`` = one group per layer, the original's default; the study's rows use
128, "#G 128", which the original scripts cannot confirm -- see ``docs/methods/pbllm.md``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..backends.protocols import BinarizationOps, GPTQOps, PipelineOps, QuantOps
from ..golden import GoldenSuite, calibration_input, proxy_loss
from ..pipeline import Method, Options, QuantConfig, register
from ..spec import llama
from ..spec.formats import PartialBinaryWeight
from ..spec.hessian import hessian
from ..spec.pbllm import BINARIZER_STATS, SALIENT_METRICS
from ..spec.quantizer import QuantSpec


@dataclass(frozen=True)
class PBLLMOptions(Options):
    """PB-LLM's settings, defaults of hahnyuan/PB-LLM ``gptq_pb/run_all.sh`` (llama-7b, 1.7 bit)."""

    low_frac: float = field(default=0.9, metadata={"help": "fraction of weights binarized (0.9: 10%% salient)"})
    high_bits: int = field(default=8, metadata={"help": "bits of the salient weights' per-row asymmetric grid"})
    salient_metric: str = field(default="hessian", metadata={
        "help": "salient score: hessian (W^2/U_jj^2, the scripts) or magnitude (|W|, the CLI default)"})
    binarizer_stats: str = field(default="code", metadata={
        "help": "binarizer mean/alpha: code (salient positions count as zeros) or binarized (the paper)"})
    percdamp: float = field(default=0.01, metadata={"help": "damping, a fraction of mean(diag H)"})
    blocksize: int = field(default=128, metadata={"help": "columns per GPTQ lazy-update block"})

    def __post_init__(self):
        if not isinstance(self.low_frac, (int, float)) or not 0 <= self.low_frac < 1:
            raise ValueError(f"low_frac must be in [0, 1); got {self.low_frac!r}.")
        if isinstance(self.high_bits, bool) or not isinstance(self.high_bits, int) or not 1 <= self.high_bits <= 8:
            raise ValueError(f"high_bits must be an integer in 1..8; got {self.high_bits!r}.")
        if self.salient_metric not in SALIENT_METRICS:
            raise ValueError(f"salient_metric must be one of {SALIENT_METRICS}; got {self.salient_metric!r}.")
        if self.binarizer_stats not in BINARIZER_STATS:
            raise ValueError(f"binarizer_stats must be one of {BINARIZER_STATS}; got {self.binarizer_stats!r}.")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize must be an integer >= 1; got {self.blocksize!r}.")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp must be >= 0; got {self.percdamp!r}.")


PRESETS = {
    "pbllm-1.7bit": {"wbits": 1, "group_size": 128, "low_frac": 0.9, "high_bits": 8, "salient_metric": "hessian"},
    "pbllm-2bit": {"wbits": 1, "group_size": 128, "low_frac": 6 / 7, "high_bits": 8, "salient_metric": "hessian"},
}
"""Named study presets (``QuantConfig.of("pbllm", **PRESETS[name])``). 1.7 bit: the authors' scripts
(``--low_frac 0.9 --high_bit 8 --salient_metric hessian``). 2 bit: no script exists anywhere; under the
paper's convention ``r * 8 + (1 - r) = 2`` gives ``r = 1/7``, i.e. ``low_frac = 6/7`` -- an assumption.
Group size 128: the study's "#G 128" (the original's default is one group per layer)."""


def stored_bits_estimate(low_frac: float, high_bits: int, group_size: int | None, in_features: int = 4096) -> float:
    """Storage bits per weight of :class:`~refquant.spec.formats.PartialBinaryWeight` for a (.., in_features)
    matrix, ignoring the rare ``sign(0)`` exceptions (used in row labels)."""
    r = 1 - low_frac
    groups = 1 / in_features if group_size is None else 1 / group_size
    return 1 + r * high_bits + (1 - r) + 32 / in_features + 32 * groups


@runtime_checkable
class PBLLMOpsForPipeline(BinarizationOps, GPTQOps, PipelineOps, QuantOps, Protocol):
    """What the layer-level PB-LLM calls: the binarization twins and the loop's statistics."""


# --------------------------------------------------------------------------------------------- golden

GOLDEN_CONFIGS = {
    "default": {},
    "g128": {"group_size": 128},
    "magnitude_g128": {"salient_metric": "magnitude", "group_size": 128},
    "lowfrac6of7_g128": {"low_frac": 6 / 7, "group_size": 128},
    "paperstats": {"binarizer_stats": "binarized", "low_frac": 0.5},
    "4bit_g32": {"high_bits": 4, "group_size": 32, "low_frac": 0.8},
}


def golden_cases():
    for shape in ("nasty256", "odd1000", "llama4096"):
        for cname, kw in GOLDEN_CONFIGS.items():
            if shape == "llama4096" and cname not in ("default", "g128"):
                continue
            kwargs = {"low_frac": 0.9, "high_bits": 8, "salient_metric": "hessian", "blocksize": 128,
                      "percdamp": 0.01, "group_size": None, "binarizer_stats": "code", **kw}
            yield shape, f"{shape}_{cname}", {"kwargs": kwargs}, shape == "llama4096"  # 4096^3 Cholesky work: slow


def golden_rule(params: dict) -> dict:
    return {"exact": ["salient_mask", "codes", "signs"], "bitwise": ["scale", "zero", "alpha", "mean", "loss"],
            "bitwise_everywhere": False, "cross_platform_rtol": 1e-9,
            "text": "masks, codes and signs identical everywhere; floats bit for bit on the generating platform, "
                    "within rtol 1e-9 where NumPy/BLAS/CPU differ (LAPACK Cholesky rounding)"}


PARITY_RULE = {
    "min_identical": 0.999,
    "proxy_loss_rtol": 0.005,
    "text": "backend (float64 working copy up to 16384 columns) vs fp64 reference: salient mask, and codes/signs, "
            "identical on >= 99.9% of weights, and proxy loss tr((W-W_hat) H (W-W_hat)^T) within 0.5% of the "
            "reference's on the same exact H",
}


def outputs(fmt, to_numpy) -> dict:
    return {"salient_mask": np.asarray(to_numpy(fmt.salient_mask), dtype=bool),
            "codes": np.asarray(to_numpy(fmt.codes), dtype=np.uint8),
            "signs": np.asarray(to_numpy(fmt.signs), dtype=np.int8),
            "scale": np.asarray(to_numpy(fmt.scale), dtype=np.float64),
            "zero": np.asarray(to_numpy(fmt.zero), dtype=np.float64),
            "alpha": np.asarray(to_numpy(fmt.alpha), dtype=np.float64),
            "mean": np.asarray(to_numpy(fmt.mean), dtype=np.float64),
            "W_hat": np.asarray(to_numpy(fmt.dequantize()), dtype=np.float64),
            "loss": np.asarray(fmt.info["loss"], dtype=np.float64)}


def golden_run(params, arrays, ops, to_device, to_numpy) -> dict:
    H = hessian(calibration_input(arrays))  # exact on every platform (refquant/golden.py)
    return outputs(ops.pbllm(to_device(arrays["W"]), to_device(H), **params["kwargs"]), to_numpy)


def golden_compare(case, arrays, expected, got, rule) -> dict:
    H = hessian(calibration_input(arrays))
    mask_same = float((expected["salient_mask"] == np.asarray(got["salient_mask"])).mean())
    sal = expected["salient_mask"]
    same = np.where(sal, expected["codes"] == np.asarray(got["codes"]), expected["signs"] == np.asarray(got["signs"]))
    e = expected  # golden files store no W_hat: rebuilt with the format
    W_hat_e = PartialBinaryWeight(e["salient_mask"], e["codes"], e["scale"], e["zero"], e["signs"], e["alpha"], e["mean"],
                                  high_bits=case.params["kwargs"]["high_bits"],
                                  group_size=case.params["kwargs"]["group_size"]).dequantize()
    loss_e = proxy_loss(arrays["W"], W_hat_e, H)
    loss_g = proxy_loss(arrays["W"], got["W_hat"], H)
    report = {"salient_mask_identical_fraction": mask_same, "codes_signs_identical_fraction": float(same.mean()),
              "proxy_loss_rel_diff": abs(loss_g - loss_e) / max(loss_e, 1e-300)}
    report["ok"] = (mask_same >= rule["min_identical"] and report["codes_signs_identical_fraction"] >= rule["min_identical"]
                    and report["proxy_loss_rel_diff"] <= rule["proxy_loss_rtol"])
    return report


# --------------------------------------------------------------------------------------------- the method


@register
class PBLLM(Method):
    """PB-LLM (:func:`refquant.pbllm`) with Hessians from the layer's (partially quantized) inputs."""

    name = "pbllm"
    Options = PBLLMOptions
    ops = PBLLMOpsForPipeline
    statistics = ("H",)
    golden = (GoldenSuite("pbllm", golden_cases, golden_rule, PARITY_RULE, golden_run, golden_compare),)
    preflight = ("pbllm",)
    bench_preset = dict(PRESETS["pbllm-1.7bit"])
    bench_default = False
    suites = ("binarization",)

    def validate(self, config: QuantConfig) -> None:
        if config.wbits != 1:
            raise ValueError(f"pbllm binarizes (1 bit) all but a salient fraction kept at --high-bits; got --wbits "
                             f"{config.wbits}: pass --wbits 1 (the paper's bit count follows from --low-frac and "
                             "--high-bits).")
        if config.sym:
            raise ValueError("pbllm's high-bit grid is the original's asymmetric per-row grid; drop --sym.")
        if config.abits != 16:
            raise ValueError(f"pbllm is weight-only; got --abits {config.abits}. Use --abits 16.")

    def weight_spec(self, config: QuantConfig) -> QuantSpec:
        """The salient weights' grid (per row, asymmetric, ``high_bits``)."""
        return QuantSpec(bits=config.options.high_bits)

    def quantize_layer(self, ctx) -> None:
        cfg, opts = ctx.config, ctx.config.options
        groups = {llama.INPUT_OF[n] for n in llama.LINEARS}
        stats = ctx.collect({g: ("H",) for g in groups})
        for group in sorted(groups):
            members = [n for n in llama.LINEARS if llama.INPUT_OF[n] == group]
            fmts = ctx.ops.pbllm_shared([ctx.get(n) for n in members], stats[group].H, low_frac=opts.low_frac,
                                        high_bits=opts.high_bits, salient_metric=opts.salient_metric,
                                        blocksize=opts.blocksize, percdamp=opts.percdamp, group_size=cfg.group_size,
                                        binarizer_stats=opts.binarizer_stats)
            for n, fmt in zip(members, fmts):
                ctx.set_quantized(n, fmt)
                ctx.info.setdefault("pbllm_loss", {})[n] = float(fmt.info.get("loss", float("nan")))
                ctx.info.setdefault("bits", {})[n] = {"paper": float(fmt.bits_per_weight),
                                                      "stored": float(fmt.storage_bits_per_weight)}

    def study_rows(self, suite: str) -> list:
        if suite != "binarization":
            return []
        rows = []
        for key, paper in (("pbllm-1.7bit", "1.7"), ("pbllm-2bit", "2")):
            p = PRESETS[key]
            stored = stored_bits_estimate(p["low_frac"], p["high_bits"], p["group_size"])
            note = "" if key == "pbllm-1.7bit" else ", low_frac 6/7 assumed"
            rows.append((key.replace("-", "_") + "_g128", f"PB-LLM {paper} bit (paper) / {stored:.2f} bit (stored), "
                         f"g128{note}", QuantConfig.of("pbllm", **p)))
        return rows


__all__ = ["PBLLM", "PBLLMOptions", "PRESETS", "stored_bits_estimate"]
