"""AWEQ's wiring unit: options (the Table 4 switches), the layer-level method, golden suite, preset, study rows.

The spec is ``refquant/spec/aweq.py`` (eq. (10) equalization, eq. (15) bias correction); the twins
are the backends' :class:`~refquant.backends.protocols.EqualizationOps`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..backends.protocols import EqualizationOps, PipelineOps, QuantOps
from ..golden import GoldenSuite, calibration_input, codes_near_ties, f64, outputs_of, spec_of
from ..pipeline import Method, Options, QuantConfig, register
from ..spec import aweq, llama
from ..spec.aweq import update_stats
from ..spec.quantizer import QuantSpec


@dataclass(frozen=True)
class AWEQOptions(Options):
    """AWEQ's Table 4 switches (both on: the paper's method) and the weight granularity."""

    awe: bool = field(default=True, metadata={"help": "activation-weight equalization (eq. (10))"})
    bc: bool = field(default=True, metadata={"help": "bias correction (eq. (15))"})
    group_quant: bool = field(default=False, metadata={
        "help": "quantize weights with --group-size/--sym instead of the paper's per-tensor eq. (1)-(2)"})


@runtime_checkable
class AWEQOpsForPipeline(EqualizationOps, PipelineOps, QuantOps, Protocol):
    """What the layer-level AWEQ calls."""


# --------------------------------------------------------------------------------------------- golden

SHAPES = ("llama4096", "odd1000", "nasty256")


def golden_cases():
    for shape in SHAPES:
        for bits, per_tensor in ((8, True), (4, True), (3, True), (4, False)):
            spec = ({"bits": bits, "per_tensor": True, "sym": False, "rule": "gptq"} if per_tensor
                    else {"bits": bits, "group_size": 128, "sym": False})
            yield shape, f"{shape}_w{bits}_{'pertensor' if per_tensor else 'g128'}", {"spec": spec}, False


def golden_rule(params: dict) -> dict:
    return {"exact": ["codes", "g_idx"], "bitwise": ["s", "scale", "zero", "bias"], "bitwise_everywhere": False,
            "cross_platform_rtol": 1e-9,
            "text": "codes identical everywhere; floats bit for bit on the generating platform, within rtol 1e-9 "
                    "elsewhere (the bias is a BLAS matrix-vector product)"}


PARITY_RULE = {
    "tie_eps": 1e-6,
    "w_hat_ulps": 4,
    "bias_rtol": 1e-4,
    "text": "s bit-identical (eq. (10) on the exact ranges); codes of W diag(s) identical except at rounding ties "
            "(tie_eps), W_hat within w_hat_ulps float32 ulps; for rows whose codes all agree, the bias within "
            "bias_rtol of sum_j |W_hat - W diag(s)|_rj |E[x]_j / s_j| of the reference",
}


def golden_run(params: dict, arrays: dict, ops, to_device, to_numpy) -> dict:
    """AWE ``s`` (eq. (10)) from the exact range of X, ``rtn(W diag(s))``, bias correction with ``E[x] / s``."""
    X, W, spec = calibration_input(arrays), arrays["W"], spec_of(params)
    st = update_stats(None, X)
    s = ops.equalization_scales(to_device(st.range), [to_device(W)])
    s_host = f64(to_numpy(s))
    W_s = ops.scale_weight(to_device(W), s)
    qw = ops.rtn(W_s, spec)
    b = ops.bias_correction(W_s, qw.dequantize(), to_device(st.mean / s_host))
    out = outputs_of(qw, to_numpy)
    out.update(s=s_host, bias=f64(to_numpy(b)))
    return out


def golden_compare(case, arrays, expected, got, rule) -> dict:
    report = {"s_identical": bool(np.array_equal(expected["s"], got["s"]))}
    W_s = arrays["W"] * expected["s"][None, :]
    r = codes_near_ties(expected, got, W_s, rule["tie_eps"], rule["w_hat_ulps"])
    same_rows = r.pop("same").all(axis=1)
    report.update(r)
    mean_s = update_stats(None, calibration_input(arrays)).mean / expected["s"]
    W_hat = expected["scale"][:, expected["g_idx"]] * (expected["codes"] - expected["zero"][:, expected["g_idx"]])
    scale_of_row = np.abs(W_hat - W_s) @ np.abs(mean_s)
    bias_err = np.abs(f64(got["bias"]) - expected["bias"])
    bad = same_rows & (bias_err > rule["bias_rtol"] * scale_of_row + 1e-300)
    report["bias_max_rel_err"] = float(np.max(np.where(same_rows, bias_err / np.maximum(scale_of_row, 1e-300), 0)))
    report["bias_beyond_rtol"] = int(bad.sum())
    report["ok"] = bool(report["s_identical"] and r["codes_differing_off_ties"] == 0
                        and r["w_hat_beyond_fp32_rounding"] == 0 and report["bias_beyond_rtol"] == 0)
    return report


# --------------------------------------------------------------------------------------------- the method


@register
class AWEQ(Method):
    """AWEQ on one LLaMA decoder layer, with the Table 4 switches ``options.awe`` / ``options.bc``.

    1. One calibration pass through the FP layer: per-channel min / max / mean (:func:`refquant.aweq.update_stats`)
       of all four distinct linear inputs (and ``max |x|`` for ``act_mode="per_tensor_static"``).
    2. Per input, the linears that read it:

       * ``attn_in`` (q/k/v) and ``mlp_in`` (gate/up) have a preceding RMSNorm: with ``awe``,
         ``s`` = :func:`refquant.aweq.equalization_scales` (eq. (10), ``r^W`` over the row-concatenated weights),
         ``gamma / s`` and ``W[:, j] * s_j``;
       * ``o_in`` (o_proj) and ``down_in`` (down_proj) have no norm in front, so no AWE (``s = 1``):
         they are only quantized and bias-corrected (docs/methods/aweq.md, choice 4);
    3. each linear is quantized with :meth:`weight_spec` (per tensor, eq. (1)-(2), by default);
    4. with ``bc``, bias correction (eq. (15)) with ``E[x] / s`` from the FP statistics: the bias
       ``-(W_q - W) E[x]`` is added to the linear's bias (created if absent: LLaMA has none, the
       saved model then has ``attention_bias`` / ``mlp_bias``);
    5. activation quantizers (``abits < 16``) via :meth:`refquant.pipeline.Method.choose_act_quant`
       (``act_mode``; the paper quantizes per tensor: ``--act-mode per_tensor``).

    Next-layer inputs come from the FP layer (``propagate = "fp"``): the paper estimates ``E[x]``
    and the ranges on the FP model before quantization.
    """

    name = "aweq"
    Options = AWEQOptions
    ops = AWEQOpsForPipeline
    touches = llama.LINEARS + llama.NORMS + tuple(n + ".bias" for n in llama.LINEARS)
    statistics = ("minmax", "mean", "absmax")
    propagate = "fp"
    suites = ("equalization",)
    golden = (GoldenSuite("aweq", golden_cases, golden_rule, PARITY_RULE, golden_run, golden_compare),)
    preflight = ("aweq", "rtn")
    bench_preset = {"wbits": 8, "group_size": None, "abits": 8, "act_mode": "per_tensor"}

    def weight_spec(self, config) -> QuantSpec:
        """Default: eq. (1)-(2) per tensor (:func:`refquant.aweq.weight_spec`); with ``group_quant`` the
        GPTQ-lineage grid with ``group_size`` / ``sym`` (``--group-quant``)."""
        if not config.options.group_quant:
            return aweq.weight_spec(config.wbits)
        return QuantSpec(bits=config.wbits, group_size=config.group_size, sym=config.sym)

    def study_rows(self, suite: str) -> list:
        """Equalization suite: the Table 4 ablation (plain, +BC, +AWE, AWE+BC) at W8A8 (per-tensor activations)
        and at weight-only INT4 / INT3 per tensor."""
        if suite != "equalization":
            return []
        ablation = (("plain", "AWEQ plain", False, False), ("bc", "AWEQ +BC", False, True),
                    ("awe", "AWEQ +AWE", True, False), ("aweq", "AWEQ (AWE+BC)", True, True))
        rows = []
        for w, extra in ((8, dict(abits=8, act_mode="per_tensor")), (4, {}), (3, {})):
            tag = f"w{w}a8" if extra else f"w{w}"
            rows += [(f"aweq_{tag}_{k}", label, QuantConfig.of("aweq", wbits=w, group_size=None, awe=awe, bc=bc, **extra))
                     for k, label, awe, bc in ablation]
        return rows

    def first_statistics(self, ctx) -> dict:
        cfg = ctx.config
        static = cfg.abits != 16 and cfg.act_mode == "per_tensor_static"
        kinds = ("minmax", "mean") + (("absmax",) if static else ())
        return {g: kinds for g in llama.INPUT_LINEARS}

    def quantize_layer(self, ctx) -> None:
        cfg, opts, ops = ctx.config, ctx.config.options, ctx.ops
        static = cfg.abits != 16 and cfg.act_mode == "per_tensor_static"
        stats = ctx.collect(self.first_statistics(ctx))
        spec = cfg.weight_spec()
        absmax = {}
        info = ctx.info.setdefault("aweq", {"ablation": aweq.AWEQConfig(awe=opts.awe, bc=opts.bc).name})
        for group, names in llama.INPUT_LINEARS.items():
            rs = stats[group].range_stats
            x_mean = np.asarray(rs.mean, dtype=np.float64)
            if static:
                absmax[group] = ops.to_numpy(stats[group].absmax).astype(np.float64)
            if opts.awe and group in llama.NORM_OF:
                norm = llama.NORM_OF[group]
                s = ops.equalization_scales(np.asarray(rs.range, dtype=np.float64), [ctx.get(n) for n in names])
                ctx.set(norm, ops.fold_into_norm(ctx.get(norm), s))
                for n in names:
                    ctx.set(n, ops.scale_weight(ctx.get(n), s))
                s_host = ops.to_numpy(s).astype(np.float64)
                x_mean = x_mean / s_host  # E[x / s]
                if static:
                    absmax[group] = absmax[group] / s_host
                info[group] = {"s_min": float(s_host.min()), "s_max": float(s_host.max())}
            for n in names:
                W = ctx.get(n)  # a torch runner returns the parameter itself: use it before set_quantized
                qw = ops.rtn(W, spec)
                b = ops.bias_correction(W, qw.dequantize(), x_mean) if opts.bc else None
                ctx.set_quantized(n, qw)
                if b is not None:
                    b0 = ctx.get(n + ".bias")
                    ctx.set(n + ".bias", b if b0 is None else b + b0)
        if opts.bc:
            _declare_biases(ctx)
        self.choose_act_quant(ctx, absmax)


def _declare_biases(ctx) -> None:
    """Every linear now has a bias: say so in a transformers model's config.

    ``save_pretrained`` writes the bias tensors either way, but ``from_pretrained`` only creates (and
    loads) them when ``attention_bias`` / ``mlp_bias`` are set -- otherwise a saved AWEQ model would
    silently reload without its bias correction. (The NumPy reference's ``llama.save`` sets both flags
    itself.) A runner without a transformers model is left alone.
    """
    hf_config = getattr(getattr(ctx.runner, "model", None), "config", None)
    if hf_config is not None and hasattr(hf_config, "attention_bias") and hasattr(hf_config, "mlp_bias"):
        hf_config.attention_bias = True
        hf_config.mlp_bias = True
