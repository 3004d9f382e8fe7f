"""DB-LLM's wiring unit: Flexible Dual Binarization per linear through the layer loop (the FDB initialisation).

The spec is ``refquant/spec/dbllm.py`` (a re-implementation from the paper, arXiv 2402.11960: the
authors released no code); the twins are the backends' :class:`~refquant.backends.protocols.DBLLMOps`.
``refquant quantize --method dbllm --wbits 2`` writes FDB's two planes and scales per linear
(``DualBinaryWeight``); the training stage of the paper (learnable scales under Deviation-Aware
Distillation) is ``refquant distill`` (``refquant/distill.py``), started from that output.

Golden suite ``dbllm``: the FDB initialisation (group sizes, offsets, symmetric grid) and the
layer-wise scale steps (``fdb_steps``, with and without a Hessian) on the three golden shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backends.protocols import DBLLMOps
from ..golden import GoldenSuite, calibration_input
from ..pipeline import Method, Options, QuantConfig, register
from ..spec import llama
from ..spec.dbllm import OFFSETS
from ..spec.hessian import hessian
from ..spec.quantizer import QuantSpec


@dataclass(frozen=True)
class DBLLMOptions(Options):
    """DB-LLM's FDB settings (no original code: refquant's defaults, each a documented choice)."""

    fdb_offset: str = field(default="zero_point", metadata={
        "help": "offset of the FDB grid: zero_point (a1 b1 + a2 b2 + c, init = 2-bit RTN's grid) or none "
                "(a1 b1 + a2 b2, the summarised formula)"})
    fdb_steps: int = field(default=0, metadata={
        "help": "layer-wise gradient steps on the FDB scales after the init (weight-space objective; 0 = init only)"})
    fdb_resplit: bool = field(default=True, metadata={
        "help": "recompute the planes with the new scales after each fdb step (the paper's forward rule)"})

    def __post_init__(self):
        if self.fdb_offset not in OFFSETS:
            raise ValueError(f"fdb_offset must be one of {OFFSETS}; got {self.fdb_offset!r}.")
        if isinstance(self.fdb_steps, bool) or not isinstance(self.fdb_steps, int) or self.fdb_steps < 0:
            raise ValueError(f"fdb_steps must be an integer >= 0; got {self.fdb_steps!r}.")


# --------------------------------------------------------------------------------------------- golden

SHAPES = ("llama4096", "odd1000", "nasty256")


def golden_cases():
    for shape in SHAPES:
        groups = (128, None) if shape == "llama4096" else (128, None, 32)
        for gs in groups:
            for offset, sym in (("zero_point", False), ("zero_point", True), ("none", False)):
                name = f"{shape}_{'g' + str(gs) if gs else 'perchannel'}_{offset}{'_sym' if sym else ''}"
                yield shape, name, {"group_size": gs, "offset": offset, "sym": sym, "steps": 0, "use_H": False}, False
        for use_H in (False, True):
            name = f"{shape}_g128_zero_point_steps2{'_H' if use_H else ''}"
            yield shape, name, {"group_size": 128, "offset": "zero_point", "sym": False, "steps": 2,
                                "use_H": use_H}, False


def golden_rule(params: dict) -> dict:
    if params["steps"] == 0:
        return {"exact": ["b1", "b2"], "bitwise": ["a1", "a2", "offset", "objective"],
                "bitwise_everywhere": True, "cross_platform_rtol": 0.0,
                "text": "the initialisation is elementwise IEEE arithmetic: identical bit for bit everywhere"}
    return {"exact": ["b1", "b2"], "bitwise": ["a1", "a2", "offset", "objective"],
            "bitwise_everywhere": False, "cross_platform_rtol": 1e-9,
            "text": "planes identical; scales bit for bit on the generating platform, within rtol 1e-9 where "
                    "BLAS summation order differs (the steps' matrix products)"}


PARITY_RULE = {
    "min_planes_identical": 0.9999,
    "scale_rtol": 1e-9,
    "objective_rtol": 1e-6,
    "text": "float64 on the device: planes identical on >= 99.99% of weights (a weight within float64 "
            "rounding of an FDB threshold may go either way), scales within rtol 1e-9 and the layer-wise "
            "objective within rtol 1e-6 of the reference (steps: matrix products in another summation order)",
}


def _H_of(params, arrays):
    return hessian(calibration_input(arrays)) if params.get("use_H") else None


def outputs_of_fdb(fmt, to_numpy) -> dict:
    out = {"b1": to_numpy(fmt.b1).astype(np.uint8), "b2": to_numpy(fmt.b2).astype(np.uint8),
           "a1": np.asarray(to_numpy(fmt.a1), dtype=np.float64), "a2": np.asarray(to_numpy(fmt.a2), dtype=np.float64),
           "offset": (np.zeros(0) if fmt.offset is None else np.asarray(to_numpy(fmt.offset), dtype=np.float64)),
           "W_hat": np.asarray(to_numpy(fmt.dequantize()), dtype=np.float64),
           "objective": np.asarray(fmt.info["objective"], dtype=np.float64)}
    return out


def golden_run(params, arrays, ops, to_device, to_numpy) -> dict:
    H = _H_of(params, arrays)
    fmt = ops.dbllm(to_device(arrays["W"]), None if H is None else to_device(H), group_size=params["group_size"],
                    sym=params["sym"], offset=params["offset"], steps=params["steps"])
    return outputs_of_fdb(fmt, to_numpy)


def golden_compare(case, arrays, expected, got, rule) -> dict:
    planes = float(np.mean(np.concatenate([(expected["b1"] == np.asarray(got["b1"])).ravel(),
                                           (expected["b2"] == np.asarray(got["b2"])).ravel()])))
    rel = 0.0
    for key in ("a1", "a2", "offset"):
        e, g = expected[key], np.asarray(got[key], dtype=np.float64)
        if e.shape != g.shape:
            return {"ok": False, "problem": f"{key}: shape {g.shape} != golden {e.shape}"}
        if e.size:
            rel = max(rel, float(np.max(np.abs(e - g) / np.maximum(np.abs(e), 1e-300))))
    oe, og = float(expected["objective"]), float(np.asarray(got["objective"]))
    obj = abs(og - oe) / max(abs(oe), 1e-300)
    report = {"planes_identical_fraction": planes, "scale_max_rel_diff": rel, "objective_rel_diff": obj}
    report["ok"] = (planes >= rule["min_planes_identical"] and rel <= rule["scale_rtol"]
                    and obj <= rule["objective_rtol"])
    return report


# --------------------------------------------------------------------------------------------- the method


@register
class DBLLM(Method):
    """DB-LLM's Flexible Dual Binarization (:func:`refquant.dbllm`) of every linear; no calibration data.

    The FDB initialisation is data-free (2-bit grid per group, re-coded as two {0, 1} planes); the
    optional ``fdb_steps`` refine the scales on the weight-space objective (``H = None``). Training
    with Deviation-Aware Distillation is the separate ``refquant distill`` stage.
    """

    name = "dbllm"
    Options = DBLLMOptions
    ops = DBLLMOps
    needs_calibration = False
    golden = (GoldenSuite("dbllm", golden_cases, golden_rule, PARITY_RULE, golden_run, golden_compare),)
    preflight = ("dbllm",)
    bench_preset = {"wbits": 2, "group_size": 128}
    bench_default = False
    suites = ("binarization",)

    def validate(self, config: QuantConfig) -> None:
        if config.wbits != 2:
            raise ValueError(f"DB-LLM is a 2-bit method (two binary planes); got --wbits {config.wbits}: pass --wbits 2.")
        if config.sym and config.options.fdb_offset != "zero_point":
            raise ValueError("--sym picks the symmetric 2-bit grid of the zero-point initialisation; it needs "
                             "--fdb-offset zero_point.")

    def weight_spec(self, config: QuantConfig) -> QuantSpec:
        return QuantSpec(bits=2, group_size=config.group_size, sym=config.sym)

    def quantize_layer(self, ctx) -> None:
        cfg, opts = ctx.config, ctx.config.options
        for name in llama.LINEARS:
            fmt = ctx.ops.dbllm(ctx.get(name), None, group_size=cfg.group_size, sym=cfg.sym, offset=opts.fdb_offset,
                                steps=opts.fdb_steps, resplit=opts.fdb_resplit)
            ctx.set_quantized(name, fmt)
            ctx.info.setdefault("fdb_objective", {})[name] = float(fmt.info["objective"])

    def study_rows(self, suite: str) -> list:
        if suite != "binarization":
            return []
        return [("dbllm_w2_g128", "DB-LLM 2 bit (g128), FDB init (no DAD training)",
                 QuantConfig.of("dbllm", wbits=2, group_size=128))]


__all__ = ["DBLLM", "DBLLMOptions"]
