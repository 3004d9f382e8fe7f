"""RTN's wiring unit: round every linear to the nearest grid point (``refquant/spec/rtn.py``); no calibration.

Golden suite ``rtn``: 48 cases (3 input shapes x bits 2/3/4/8 x sym/asym x per-channel/g128),
bit-identical on every platform (elementwise IEEE arithmetic only).
"""
from __future__ import annotations

import itertools


from ..backends.protocols import QuantOps
from ..golden import GoldenSuite, codes_near_ties, outputs_of, spec_of
from ..pipeline import Method, register
from ..spec import llama

SHAPES = ("llama4096", "odd1000", "nasty256")


def golden_cases():
    for shape in SHAPES:
        for bits, sym, gs in itertools.product((2, 3, 4, 8), (False, True), (None, 128)):
            spec = {"bits": bits, "group_size": gs, "sym": sym}
            name = f"{shape}_w{bits}_{'sym' if sym else 'asym'}_{'g' + str(gs) if gs else 'perchannel'}"
            yield shape, name, {"spec": spec}, False


def golden_rule(params: dict) -> dict:
    return {"exact": ["codes", "g_idx"], "bitwise": ["scale", "zero"], "bitwise_everywhere": True,
            "cross_platform_rtol": 0.0,
            "text": "elementwise IEEE arithmetic only: identical bit for bit on every platform"}


PARITY_RULE = {
    "tie_eps": 1e-6,
    "w_hat_ulps": 4,
    "text": "codes identical except where the reference's W/scale lies within tie_eps (relative) of a "
            "rounding tie (then off by at most 1); where codes agree, W_hat within w_hat_ulps float32 "
            "ulps of max(|W_hat|, scale)",
}


def golden_run(params, arrays, ops, to_device, to_numpy) -> dict:
    return outputs_of(ops.rtn(to_device(arrays["W"]), spec_of(params)), to_numpy)


def golden_compare(case, arrays, expected, got, rule) -> dict:
    r = codes_near_ties(expected, got, arrays["W"], rule["tie_eps"], rule["w_hat_ulps"])
    r.pop("same")
    r["ok"] = r["codes_differing_off_ties"] == 0 and r["w_hat_beyond_fp32_rounding"] == 0
    return r


@register
class RTN(Method):
    """Round-to-nearest every linear (:func:`refquant.rtn`); no calibration data."""

    name = "rtn"
    ops = QuantOps
    needs_calibration = False
    golden = (GoldenSuite("rtn", golden_cases, golden_rule, PARITY_RULE, golden_run, golden_compare),)
    preflight = ("rtn",)
    bench_preset = {"wbits": 4, "group_size": 128}
    bench_default = True

    def quantize_layer(self, ctx) -> None:
        spec = ctx.config.weight_spec()
        for name in llama.LINEARS:
            ctx.set_quantized(name, ctx.ops.rtn(ctx.get(name), spec))


__all__ = ["RTN"]
