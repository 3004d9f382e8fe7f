"""BiLLM's wiring unit: options (the authors' defaults), the layer-level method, golden suite, presets, study rows.

The spec is ``refquant/spec/billm.py`` (shared binarization primitives in ``refquant/spec/binarize.py``);
the twins are the backends' :class:`~refquant.backends.protocols.BinarizationOps` (the torch twin runs
every search candidate at once). Hessians come from the layer's (partially quantized) inputs, as
GPTQ's; q/k/v and gate/up share theirs (``ops.billm_shared``: one factorization, searches per matrix).

BiLLM binarizes: the shared ``--wbits`` must be 1; its group is its block (``--group-size`` must equal
``--blocksize``, 128, or be -1). "1.1 bit" is an outcome (``1 + salient columns / in_features``), not a
setting; every run records both bit counts per linear (``info["bits"]``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..backends.protocols import BinarizationOps, GPTQOps, PipelineOps, QuantOps
from ..golden import GoldenSuite, calibration_input, proxy_loss
from ..pipeline import Method, Options, QuantConfig, register
from ..spec import llama
from ..spec.billm import NARROW_BLOCKS, SALIENT_METRICS, SEARCH_ON
from ..spec.formats import StructuredBinaryWeight
from ..spec.hessian import hessian
from ..spec.quantizer import QuantSpec


@dataclass(frozen=True)
class BiLLMOptions(Options):
    """BiLLM's settings, defaults of Aaronhuang-778/BiLLM ``run.py`` / README (method braq, hessian)."""

    salient_metric: str = field(default="hessian", metadata={
        "help": "saliency: hessian (W^2/U_jj^2, the README's runs) or magnitude (signed W, the CLI default)"})
    search_on: str = field(default="saliency", metadata={
        "help": "searches' objective and quantiles on the saliency matrix (saliency, the code) or on W (weight, "
                "the paper's text)"})
    narrow_blocks: str = field(default="extend", metadata={
        "help": "blocks narrower than 50 columns: extend (k = 1..width-1) or error (the original crashes)"})
    percdamp: float = field(default=0.01, metadata={"help": "damping, a fraction of mean(diag H)"})
    blocksize: int = field(default=128, metadata={"help": "columns per block (= binarization group)"})

    def __post_init__(self):
        if self.salient_metric not in SALIENT_METRICS:
            raise ValueError(f"salient_metric must be one of {SALIENT_METRICS}; got {self.salient_metric!r}.")
        if self.search_on not in SEARCH_ON:
            raise ValueError(f"search_on must be one of {SEARCH_ON}; got {self.search_on!r}.")
        if self.narrow_blocks not in NARROW_BLOCKS:
            raise ValueError(f"narrow_blocks must be one of {NARROW_BLOCKS}; got {self.narrow_blocks!r}.")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize must be an integer >= 1; got {self.blocksize!r}.")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp must be >= 0; got {self.percdamp!r}.")


PRESETS = {"billm-1.1bit": {"wbits": 1, "group_size": 128, "salient_metric": "hessian", "blocksize": 128}}
"""Named study preset: BiLLM's defaults. "1.1 bit" is the paper's measured outcome on LLaMA, not a setting."""


@runtime_checkable
class BiLLMOpsForPipeline(BinarizationOps, GPTQOps, PipelineOps, QuantOps, Protocol):
    """What the layer-level BiLLM calls: the binarization twins and the loop's statistics."""


# --------------------------------------------------------------------------------------------- golden

GOLDEN_CONFIGS = {
    "default": {},
    "magnitude": {"salient_metric": "magnitude"},
    "searchweight": {"search_on": "weight"},
    "block64": {"blocksize": 64},
}


def golden_cases():
    for shape in ("nasty256", "odd1000", "llama4096"):
        for cname, kw in GOLDEN_CONFIGS.items():
            if shape == "llama4096" and cname != "default":
                continue
            kwargs = {"blocksize": 128, "percdamp": 0.01, "salient_metric": "hessian", "search_on": "saliency",
                      "narrow_blocks": "extend", **kw}
            yield shape, f"{shape}_{cname}", {"kwargs": kwargs}, shape == "llama4096"  # 4096^3 Cholesky work: slow


def golden_rule(params: dict) -> dict:
    return {"exact": ["salient_columns", "split", "signs1", "signs2"],
            "bitwise": ["alpha", "mean", "loss"], "bitwise_everywhere": False, "cross_platform_rtol": 1e-9,
            "text": "column choices, splits and signs identical everywhere; floats bit for bit on the generating "
                    "platform, within rtol 1e-9 where NumPy/BLAS/CPU differ"}


PARITY_RULE = {
    "min_salient_columns_identical": 0.95,
    "min_split_identical": 0.99,
    "proxy_loss_rtol": 0.01,
    "text": "backend (float32 searches on CUDA, float64 binarization and feedback) vs fp64 reference: the "
            "salient-column flags identical on >= 95% of columns, the group-1/2 split on >= 99% of weights "
            "(a search whose two best candidates lie within float32 rounding may pick the other), and proxy loss "
            "tr((W-W_hat) H (W-W_hat)^T) within 1% of the reference's on the same exact H",
}


def outputs(fmt, to_numpy) -> dict:
    return {"salient_columns": np.asarray(to_numpy(fmt.salient_columns), dtype=bool),
            "split": np.asarray(to_numpy(fmt.split), dtype=bool),
            "signs1": np.asarray(to_numpy(fmt.signs1), dtype=np.int8),
            "signs2": np.asarray(to_numpy(fmt.signs2), dtype=np.int8),
            "alpha": np.asarray(to_numpy(fmt.alpha), dtype=np.float64),
            "mean": np.asarray(to_numpy(fmt.mean), dtype=np.float64),
            "W_hat": np.asarray(to_numpy(fmt.dequantize()), dtype=np.float64),
            "loss": np.asarray(fmt.info["loss"], dtype=np.float64)}


def golden_run(params, arrays, ops, to_device, to_numpy) -> dict:
    H = hessian(calibration_input(arrays))  # exact on every platform (refquant/golden.py)
    return outputs(ops.billm(to_device(arrays["W"]), to_device(H), **params["kwargs"]), to_numpy)


def golden_compare(case, arrays, expected, got, rule) -> dict:
    H = hessian(calibration_input(arrays))
    cols = float((expected["salient_columns"] == np.asarray(got["salient_columns"])).mean())
    split = float((expected["split"] == np.asarray(got["split"])).mean())
    e = expected  # golden files store no W_hat: rebuilt with the format
    W_hat_e = StructuredBinaryWeight(e["salient_columns"], e["split"], e["signs1"], e["signs2"], e["alpha"], e["mean"],
                                     block_size=case.params["kwargs"]["blocksize"]).dequantize()
    loss_e = proxy_loss(arrays["W"], W_hat_e, H)
    loss_g = proxy_loss(arrays["W"], got["W_hat"], H)
    report = {"salient_columns_identical_fraction": cols, "split_identical_fraction": split,
              "proxy_loss_rel_diff": abs(loss_g - loss_e) / max(loss_e, 1e-300)}
    report["ok"] = (cols >= rule["min_salient_columns_identical"] and split >= rule["min_split_identical"]
                    and report["proxy_loss_rel_diff"] <= rule["proxy_loss_rtol"])
    return report


# --------------------------------------------------------------------------------------------- the method


@register
class BiLLM(Method):
    """BiLLM (:func:`refquant.billm`) with Hessians from the layer's (partially quantized) inputs."""

    name = "billm"
    Options = BiLLMOptions
    ops = BiLLMOpsForPipeline
    statistics = ("H",)
    golden = (GoldenSuite("billm", golden_cases, golden_rule, PARITY_RULE, golden_run, golden_compare),)
    preflight = ("billm",)
    bench_preset = dict(PRESETS["billm-1.1bit"])
    bench_default = False
    suites = ("binarization",)

    def validate(self, config: QuantConfig) -> None:
        opts = config.options
        if config.wbits != 1:
            raise ValueError(f"billm binarizes (1 bit; salient columns get a second residual bit); got --wbits "
                             f"{config.wbits}: pass --wbits 1.")
        if config.group_size not in (None, opts.blocksize):
            raise ValueError(f"billm's binarization group is its block: --group-size must equal --blocksize "
                             f"({opts.blocksize}) or be -1; got {config.group_size}.")
        if config.sym:
            raise ValueError("billm has no symmetric grid; drop --sym.")
        if config.abits != 16:
            raise ValueError(f"billm is weight-only; got --abits {config.abits}. Use --abits 16.")

    def weight_spec(self, config: QuantConfig) -> QuantSpec:
        """One bit per weight, grouped by block (the binary format is not a uniform grid; this names it)."""
        return QuantSpec(bits=1, group_size=config.options.blocksize)

    def quantize_layer(self, ctx) -> None:
        opts = ctx.config.options
        groups = {llama.INPUT_OF[n] for n in llama.LINEARS}
        stats = ctx.collect({g: ("H",) for g in groups})
        for group in sorted(groups):
            members = [n for n in llama.LINEARS if llama.INPUT_OF[n] == group]
            fmts = ctx.ops.billm_shared([ctx.get(n) for n in members], stats[group].H, blocksize=opts.blocksize,
                                        percdamp=opts.percdamp, salient_metric=opts.salient_metric,
                                        search_on=opts.search_on, narrow_blocks=opts.narrow_blocks)
            for n, fmt in zip(members, fmts):
                ctx.set_quantized(n, fmt)
                ctx.info.setdefault("billm_loss", {})[n] = float(fmt.info.get("loss", float("nan")))
                ctx.info.setdefault("bits", {})[n] = {"paper": float(fmt.bits_per_weight),
                                                      "stored": float(fmt.storage_bits_per_weight)}

    def study_rows(self, suite: str) -> list:
        if suite != "binarization":
            return []
        return [("billm_1.1bit_g128", "BiLLM 1.1 bit (paper, an outcome) / ~3.0 bit (stored), g128",
                 QuantConfig.of("billm", **PRESETS["billm-1.1bit"]))]


__all__ = ["BiLLM", "BiLLMOptions", "PRESETS"]
