"""SmoothQuant's wiring unit: options, the layer-level method, golden suite, benchmark preset, study rows.

The spec is ``refquant/spec/smoothquant.py`` (and ``refquant/spec/actquant.py``); the twins are the
backends' :class:`~refquant.backends.protocols.EqualizationOps`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..backends.protocols import EqualizationOps, PipelineOps, QuantOps
from ..golden import GoldenSuite, calibration_input, codes_near_ties, f64, outputs_of, rounding_tie, spec_of
from ..pipeline import Method, Options, QuantConfig, register
from ..spec import llama
from ..spec.quantizer import QuantSpec
from ..spec.smoothquant import ALPHA_LLAMA


@dataclass(frozen=True)
class SmoothQuantOptions(Options):
    """SmoothQuant's migration strength (``examples/ppl_eval.sh`` of mit-han-lab/smoothquant: 0.85
    for Llama-2-7B/13B and Llama-3-8B/70B)."""

    alpha: float = field(default=ALPHA_LLAMA, metadata={"help": "SmoothQuant migration strength in [0, 1]"})

    def __post_init__(self):
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {self.alpha!r}.")


@runtime_checkable
class SmoothQuantOpsForPipeline(EqualizationOps, PipelineOps, QuantOps, Protocol):
    """What the layer-level SmoothQuant calls."""


# --------------------------------------------------------------------------------------------- golden

SHAPES = ("llama4096", "odd1000", "nasty256")


def golden_cases():
    for shape in SHAPES:
        for bits, alpha in ((8, 0.85), (8, 0.5), (6, 0.85), (4, 0.85)):
            params = {"spec": {"bits": bits, "group_size": None, "rule": "absmax"}, "alpha": alpha}
            if shape == "nasty256":
                params["act_bits"] = bits  # activation codes: (8 x 32 x 256) int8 per case
            yield shape, f"{shape}_w{bits}_alpha{alpha}", params, False


def golden_rule(params: dict) -> dict:
    act = ["act_codes"] if (params or {}).get("act_bits") else []
    return {"exact": ["codes", "g_idx"] + act, "bitwise": ["s", "scale", "zero"] + (["act_step"] if act else []),
            "bitwise_everywhere": False, "cross_platform_rtol": 1e-12,
            "text": "codes identical everywhere; s (x^alpha / w^(1-alpha): libm pow) and the quantizer floats "
                    "bit for bit on the generating platform, within rtol 1e-12 elsewhere"}


PARITY_RULE = {
    "tie_eps": 1e-6,
    "w_hat_ulps": 4,
    "text": "s bit-identical (the reference formula on the exact channel absmax); codes of W diag(s) (absmax "
            "per channel) and per-token activation codes of X diag(s)^-1 identical except within tie_eps "
            "(relative) of a rounding tie, then off by at most 1; where codes agree, W_hat within w_hat_ulps "
            "float32 ulps of max(|W_hat|, scale)",
}


def golden_run(params: dict, arrays: dict, ops, to_device, to_numpy) -> dict:
    """``s`` from the channel absmax of X (exact), ``rtn(W diag(s), absmax per channel)``, and (with
    ``act_bits``) the per-token activation codes of ``X diag(s)^-1``."""
    X, W = calibration_input(arrays), arrays["W"]
    absmax = np.abs(X.reshape(-1, X.shape[-1])).max(axis=0)
    s = ops.smooth_scales(to_device(absmax), [to_device(W)], params["alpha"])
    qw = ops.rtn(ops.scale_weight(to_device(W), s), spec_of(params))
    out = outputs_of(qw, to_numpy)
    out["s"] = f64(to_numpy(s))
    if params.get("act_bits"):
        Xs = X / out["s"]
        X_hat = f64(to_numpy(ops.quantize_activation(to_device(Xs), params["act_bits"], "per_token")))
        step = np.maximum(np.abs(Xs).max(axis=-1), 1e-5) / (2 ** (params["act_bits"] - 1) - 1)
        out["act_step"] = step
        out["act_codes"] = np.rint(X_hat / step[..., None]).astype(np.int8)
    return out


def golden_compare(case, arrays, expected, got, rule) -> dict:
    report = {}
    report["s_identical"] = bool(np.array_equal(expected["s"], got["s"]))
    W_s = arrays["W"] * expected["s"][None, :]
    r = codes_near_ties(expected, got, W_s, rule["tie_eps"], rule["w_hat_ulps"])
    r.pop("same")
    report.update(r)
    ok = report["s_identical"] and r["codes_differing_off_ties"] == 0 and r["w_hat_beyond_fp32_rounding"] == 0
    if "act_codes" in expected:
        ce, cg = expected["act_codes"].astype(np.int64), got["act_codes"].astype(np.int64)
        Xs = calibration_input(arrays) / expected["s"]
        tie = rounding_tie(Xs / expected["act_step"][..., None], rule["tie_eps"])
        bad = (ce != cg) & ~(tie & (np.abs(ce - cg) <= 1))
        report["act_codes_identical_fraction"] = float((ce == cg).mean())
        report["act_codes_differing_off_ties"] = int(bad.sum())
        ok = ok and report["act_codes_differing_off_ties"] == 0
    report["ok"] = bool(ok)
    return report


# --------------------------------------------------------------------------------------------- the method


@register
class SmoothQuant(Method):
    """SmoothQuant on one LLaMA decoder layer (``smooth_lm`` + ``quantize_llama_like``).

    1. One calibration pass through the FP layer: per-channel ``max |x|`` of the ``q_proj`` input
       (``attn_in``) and the ``gate_proj`` input (``mlp_in``) -- and of ``o_in`` / ``down_in`` too
       for ``act_mode="per_tensor_static"``.
    2. The two LLaMA smoothing sites: ``input_layernorm -> q/k/v`` and
       ``post_attention_layernorm -> gate/up``; ``s`` = ``smooth_scales`` with ``options.alpha``
       (0.85 for LLaMA), ``gamma / s`` and ``W[:, j] * s_j``. ``o_proj`` and ``down_proj`` are not
       smoothed.
    3. All seven linears: per-output-channel absmax weights (``QuantSpec(wbits, rule="absmax")``,
       ``quantize_weight_per_channel_absmax``); activations of every linear per token
       (:meth:`refquant.pipeline.Method.choose_act_quant`: ``abits``, ``act_mode``;
       ``quantize_bmm_input`` also quantizes the q/k/v outputs, the original's W8A8 recipe).

    The next layer's inputs come from the FP layer (``propagate = "fp"``): the original computes
    the activation scales of every layer on the FP model in one pass before smoothing.
    """

    name = "smoothquant"
    Options = SmoothQuantOptions
    ops = SmoothQuantOpsForPipeline
    touches = llama.LINEARS + llama.NORMS
    statistics = ("absmax",)
    propagate = "fp"
    suites = ("equalization",)
    golden = (GoldenSuite("smoothquant", golden_cases, golden_rule, PARITY_RULE, golden_run, golden_compare),)
    preflight = ("smoothquant", "rtn")
    bench_preset = {"wbits": 8, "group_size": None, "abits": 8, "act_mode": "per_token", "quantize_bmm_input": True,
                    "alpha": 0.85}
    bench_default = True

    def weight_spec(self, config) -> QuantSpec:
        """Per-output-channel symmetric absmax (the original's only weight granularity for LLaMA).

        ``group_size`` and ``sym`` do not apply (the absmax grid is symmetric by construction);
        ``wbits`` is the weight width (``--wbits 8 --abits 8`` for W8A8).
        """
        return QuantSpec(bits=config.wbits, rule="absmax")

    def study_rows(self, suite: str) -> list:
        """Equalization suite: W8A8, W6A6, W4A4 (alpha 0.85, BMM inputs quantized)."""
        if suite != "equalization":
            return []
        return [(f"smoothquant_w{b}a{b}", "SmoothQuant",
                 QuantConfig.of("smoothquant", wbits=b, group_size=None, abits=b, quantize_bmm_input=True, alpha=0.85))
                for b in (8, 6, 4)]

    def first_statistics(self, ctx) -> dict:
        cfg = ctx.config
        static = cfg.abits != 16 and cfg.act_mode == "per_tensor_static"
        return {g: ("absmax",) for g in (tuple(llama.INPUT_LINEARS) if static else tuple(llama.NORM_OF))}

    def quantize_layer(self, ctx) -> None:
        cfg, ops, alpha = ctx.config, ctx.ops, ctx.config.options.alpha
        requests = self.first_statistics(ctx)
        groups = tuple(requests)
        stats = ctx.collect(requests)
        absmax = {g: ops.to_numpy(stats[g].absmax).astype("float64") for g in groups}
        info = ctx.info.setdefault("smoothquant", {"alpha": float(alpha)})
        for group, norm in llama.NORM_OF.items():
            names = llama.INPUT_LINEARS[group]
            s = ops.smooth_scales(absmax[group], [ctx.get(n) for n in names], alpha)
            ctx.set(norm, ops.fold_into_norm(ctx.get(norm), s))
            for n in names:
                ctx.set(n, ops.scale_weight(ctx.get(n), s))
            s_host = ops.to_numpy(s).astype("float64")
            absmax[group] = absmax[group] / s_host  # the smoothed input's absmax (static activation scales)
            info[group] = {"s_min": float(s_host.min()), "s_max": float(s_host.max())}
        spec = cfg.weight_spec()
        for n in llama.LINEARS:
            ctx.set_quantized(n, ops.rtn(ctx.get(n), spec))
        self.choose_act_quant(ctx, absmax)
