"""SliM-LLM's wiring unit: options, the layer-level method (SBA + SQC/GPTQ), golden suites, study rows.

The spec is ``refquant/spec/slim.py`` (:func:`refquant.slim_allocate`, :func:`refquant.slim_llm`);
the twins are the backends' :class:`~refquant.backends.protocols.SliMOps`. Golden suites:
``slim_allocate`` (the allocation search, its per-sample KL errors and the applied allocation) and
``slim`` (SQC + GPTQ with given per-group widths). See ``docs/methods/slim.md``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..backends.protocols import PipelineOps, QuantOps, SliMOps
from ..golden import GoldenSuite, calibration_input, proxy_loss
from ..pipeline import Method, Options, QuantConfig, register
from ..spec import llama
from ..spec.hessian import hessian
from ..spec.slim import check_target_bits

SEARCH = "search"


@dataclass(frozen=True)
class SliMOptions(Options):
    """SliM-LLM's settings, defaults of Aaronhuang-778/SliM-LLM ``run.py`` / ``slim_gptq.py``."""

    slim_allocation: str = field(default=SEARCH, metadata={
        "help": "'search' (SBA on the calibration data, as run.py without a saved allocation) or a JSON file of "
                "per-group widths {layer: {linear: [bits, ...]}} (the authors' block_precision_*.pt converted)"})
    percdamp: float = field(default=0.01, metadata={"help": "damping, a fraction of mean(diag H)"})
    lambda_salience: float = field(default=1.0, metadata={
        "help": "SQC weight of the salient elements' error (1 = no-op, the code's default)"})
    slim_sym_quirk: str = field(default="auto", metadata={
        "help": "the code's sym=True start of each layer's quantizer: auto (on with the search, off with a loaded "
                "allocation, as the code), on, off"})
    slim_salience_damp: float | None = field(default=None, metadata={
        "help": "get_salience's in-place absolute diagonal damping before GPTQ; default: 0.01 with the search, "
                "0 (step skipped) with a loaded allocation, as the code"})
    slim_search_samples: int | None = field(default=None, metadata={
        "help": "calibration sequences the allocation search uses (default: all, as the code)"})

    def __post_init__(self):
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp must be >= 0; got {self.percdamp!r}.")
        if not (np.isfinite(self.lambda_salience) and self.lambda_salience >= 0):
            raise ValueError(f"lambda_salience must be a finite number >= 0; got {self.lambda_salience!r}.")
        if self.slim_sym_quirk not in ("auto", "on", "off"):
            raise ValueError(f"slim_sym_quirk must be auto, on or off; got {self.slim_sym_quirk!r}.")
        if self.slim_salience_damp is not None and not self.slim_salience_damp >= 0:
            raise ValueError(f"slim_salience_damp must be >= 0; got {self.slim_salience_damp!r}.")
        if self.slim_search_samples is not None and (isinstance(self.slim_search_samples, bool)
                                                     or self.slim_search_samples < 1):
            raise ValueError(f"slim_search_samples must be a positive integer; got {self.slim_search_samples!r}.")
        if self.slim_allocation != SEARCH and not os.path.isfile(self.slim_allocation):
            raise ValueError(f"slim_allocation must be 'search' or an existing JSON file; {self.slim_allocation!r} "
                             "does not exist.")

    @property
    def searched(self) -> bool:
        return self.slim_allocation == SEARCH

    @property
    def sym_quirk(self) -> bool:
        return {"on": True, "off": False}.get(self.slim_sym_quirk, self.searched)

    @property
    def salience_damp(self) -> float:
        if self.slim_salience_damp is not None:
            return float(self.slim_salience_damp)
        return 0.01 if self.searched else 0.0


@runtime_checkable
class SliMOpsForPipeline(SliMOps, PipelineOps, QuantOps, Protocol):
    """What the layer-level SliM-LLM calls: the SliM twin and the loop's statistics."""


def load_allocation(path: str) -> dict:
    """``{layer index: {linear name: [bits, ...]}}`` from a JSON file (keys may be strings)."""
    with open(path) as f:
        raw = json.load(f)
    try:
        return {int(layer): {str(n): [int(b) for b in bits] for n, bits in linears.items()}
                for layer, linears in raw.items()}
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected {{layer: {{linear: [bits, ...]}}}} (e.g. {{\"0\": {{\"self_attn.q_proj\": "
                         f"[2, 3, 1, ...]}}}}); {e}") from None


# --------------------------------------------------------------------------------------------- golden
# Inputs: the golden shapes of tools/make_golden.py (nasty256: 32 x 256, dead inputs, zero row/group;
# odd1000: 12 x 1000, a partial last group; llama4096: 8 x 4096, 32 groups of 128).

def _pattern(n_groups: int, bits: int, seed: int) -> list[int]:
    """A fixed per-group allocation with equal counts at bits-1 and bits+1 (the first group low: the quirk acts)."""
    k = max(1, n_groups // 4)
    order = np.random.default_rng(seed).permutation(n_groups)
    order = np.concatenate([[0], order[order != 0]])
    gb = np.full(n_groups, bits)
    gb[order[:k]] = bits - 1
    gb[order[-k:]] = bits + 1
    return [int(b) for b in gb]


def allocate_cases():
    for shape, gs, bits_list, slow in (("nasty256", 32, (2, 3, 4), False), ("odd1000", 128, (3,), False),
                                       ("llama4096", 128, (3,), False), ("llama4096", 128, (2, 4), True)):
        for bits in bits_list:
            yield shape, f"{shape}_w{bits}_g{gs}", {"bits": bits, "group_size": gs}, slow


def allocate_rule(params: dict) -> dict:
    return {"exact": ["group_bits", "search_bits", "k"], "bitwise": ["errors"], "bitwise_everywhere": False,
            "cross_platform_rtol": 1e-9,
            "text": "allocations identical everywhere; KL errors bit for bit on the generating platform, within "
                    "rtol 1e-9 elsewhere"}


ALLOCATE_PARITY_RULE = {
    "errors_rtol": 2e-3,
    "text": "fp32 backend vs fp64 reference: every trial's per-sample KL within 0.2% of max |KL_ref|; the chosen k "
            "identical, or the reference's mean KL at the backend's k within 0.2% of the minimum (a tie); the "
            "applied allocation identical when k is",
}


def allocate_run(params, arrays, ops, to_device, to_numpy) -> dict:
    X = calibration_input(arrays)
    r = ops.slim_search(to_device(arrays["W"]), to_device(hessian(X)), to_device(X), bits=params["bits"],
                        group_size=params["group_size"])
    return {"errors": np.asarray(to_numpy(r.errors), dtype=np.float64), "k": np.asarray(r.k),
            "search_bits": np.asarray(to_numpy(r.search_bits)), "group_bits": np.asarray(to_numpy(r.group_bits))}


def allocate_compare(case, arrays, expected, got, rule) -> dict:
    e, g = expected["errors"], np.asarray(got["errors"], dtype=np.float64)
    rel = float(np.max(np.abs(g - e)) / max(float(np.max(np.abs(e))), 1e-300))
    k_e, k_g = int(expected["k"]), int(got["k"])
    mean = e.mean(axis=0)
    tie = mean[k_g - 1] <= mean.min() + rule["errors_rtol"] * max(float(np.max(np.abs(e))), 1e-300)
    same_bits = bool(np.array_equal(expected["group_bits"], got["group_bits"]))
    ok = rel <= rule["errors_rtol"] and ((k_e == k_g and same_bits) or (k_e != k_g and tie))
    return {"errors_rel_diff": rel, "k_expected": k_e, "k_got": k_g, "group_bits_identical": same_bits, "ok": ok}


def quant_cases():
    grid = [("nasty256", 32, b, quirk, damp, 1.0, False) for b in (2, 3, 4) for quirk in (True, False)
            for damp in (0.01, 0.0)]
    grid += [("nasty256", 32, 3, True, 0.01, 2.0, False), ("odd1000", 128, 3, True, 0.01, 1.0, False),
             ("odd1000", 128, 2, False, 0.0, 1.0, False), ("llama4096", 128, 3, True, 0.01, 1.0, True),
             ("llama4096", 128, 2, True, 0.01, 1.0, True), ("llama4096", 128, 4, True, 0.01, 1.0, True)]
    cols = {"nasty256": 256, "odd1000": 1000, "llama4096": 4096}
    for shape, gs, bits, quirk, damp, lam, slow in grid:
        n_groups = -(-cols[shape] // gs)
        params = {"bits": bits, "group_size": gs, "group_bits": _pattern(n_groups, bits, seed=bits),
                  "sym_quirk": quirk, "salience_damp": damp, "lambda_salience": lam, "percdamp": 0.01}
        name = (f"{shape}_w{bits}_g{gs}{'_quirk' if quirk else ''}{'_sdamp' if damp else ''}"
                f"{'_lambda' + str(lam) if lam != 1.0 else ''}")
        yield shape, name, params, slow


def quant_rule(params: dict) -> dict:
    return {"exact": ["codes", "group_bits"], "bitwise": ["scale", "zero", "loss"], "bitwise_everywhere": False,
            "cross_platform_rtol": 1e-9,
            "text": "codes identical everywhere; floats bit for bit on the generating platform, within rtol 1e-9 "
                    "where NumPy/BLAS/CPU differ (LAPACK Cholesky rounding)"}


QUANT_PARITY_RULE = {
    "min_codes_identical": 0.999,
    "proxy_loss_rtol": 0.005,
    "text": "fp32/fp64 backend vs fp64 reference: >= 99.9% identical codes and the proxy loss "
            "tr((W-W_hat) H (W-W_hat)^T) within 0.5% of the reference's, on the same exact H",
}


def _slim_kwargs(params: dict) -> dict:
    return {k: params[k] for k in ("bits", "group_size", "percdamp", "lambda_salience", "sym_quirk", "salience_damp")}


def quant_run(params, arrays, ops, to_device, to_numpy) -> dict:
    H = hessian(calibration_input(arrays))
    qw = ops.slim_llm(to_device(arrays["W"]), to_device(H), group_bits=np.asarray(params["group_bits"]),
                      **_slim_kwargs(params))
    return {"codes": to_numpy(qw.codes), "scale": np.asarray(to_numpy(qw.scale), dtype=np.float64),
            "zero": np.asarray(to_numpy(qw.zero), dtype=np.float64), "group_bits": np.asarray(to_numpy(qw.group_bits)),
            "W_hat": np.asarray(to_numpy(qw.dequantize()), dtype=np.float64),
            "loss": np.asarray(qw.info["loss"], dtype=np.float64)}


def _w_hat(out: dict, group_size: int) -> np.ndarray:
    codes = out["codes"].astype(np.float64)
    g = np.arange(codes.shape[1]) // group_size
    S, Z = out["scale"][:, g], out["zero"][:, g]
    one = (np.asarray(out["group_bits"])[g] == 1)[None, :]
    return np.where(one, (codes - 1) * S + Z, S * (codes - Z))


def quant_compare(case, arrays, expected, got, rule) -> dict:
    same = float((expected["codes"].astype(np.int64) == np.asarray(got["codes"]).astype(np.int64)).mean())
    H = hessian(calibration_input(arrays))
    loss_e = proxy_loss(arrays["W"], _w_hat(expected, case.params["group_size"]), H)
    loss_g = proxy_loss(arrays["W"], got["W_hat"], H)
    rel = abs(loss_g - loss_e) / max(loss_e, 1e-300)
    return {"codes_identical_fraction": same, "proxy_loss_rel_diff": rel,
            "ok": same >= rule["min_codes_identical"] and rel <= rule["proxy_loss_rtol"]}


# --------------------------------------------------------------------------------------------- the method


@register
class SliMLLM(Method):
    """SliM-LLM (:func:`refquant.slim_allocate` + :func:`refquant.slim_llm`) on one decoder layer.

    As ``run.py``'s ``quant_sequential``: one pass through the FP layer gives every linear's Hessian
    and its calibration inputs (the search's second pass sees the same FP layer); each linear is
    allocated (the search, or a loaded allocation) and quantized from those; next-layer inputs come
    from the quantized layer (``propagate = "quantized"``).
    """

    name = "slim"
    Options = SliMOptions
    ops = SliMOpsForPipeline
    statistics = ("H", "inputs")
    golden = (GoldenSuite("slim_allocate", allocate_cases, allocate_rule, ALLOCATE_PARITY_RULE, allocate_run,
                          allocate_compare),
              GoldenSuite("slim", quant_cases, quant_rule, QUANT_PARITY_RULE, quant_run, quant_compare))
    preflight = ("slim_allocate", "slim")
    bench_preset = {"wbits": 3, "group_size": 128}
    bench_default = False
    suites = ("slim",)

    def validate(self, config: QuantConfig) -> None:
        check_target_bits(config.wbits)
        if config.group_size is None:
            raise ValueError("SliM-LLM allocates bits per group: pass --group-size (the code's default 128).")
        if config.sym:
            raise ValueError("SliM-LLM's quantizer is asymmetric (its sym quirk is --slim-sym-quirk); drop --sym.")
        if config.abits != 16:
            raise ValueError("SliM-LLM quantizes weights only; drop --abits.")

    def study_rows(self, suite: str) -> list:
        """The journal study's SliM-LLM rows (4/3/2 bit, g128) beside GPTQ at the same settings."""
        if suite != "slim":
            return []
        return [(f"{m}_w{b}_g128", label, QuantConfig.of(m, wbits=b, group_size=128))
                for b in (4, 3, 2) for m, label in (("gptq", "GPTQ"), ("slim", "SliM-LLM"))]

    def quantize_layer(self, ctx) -> None:
        cfg, opts, ops = ctx.config, ctx.config.options, ctx.ops
        stats = ctx.collect({g: ("H", "inputs") for g in llama.INPUT_LINEARS})
        loaded = None if opts.searched else load_allocation(opts.slim_allocation)
        info = ctx.info.setdefault("slim", {})
        for group, names in llama.INPUT_LINEARS.items():
            # the kept inputs are handed over (no second copy); each group's are freed when its linears are done
            take = getattr(stats[group], "take_inputs", None)
            H, X = stats[group].H, (take() if take is not None else stats[group].inputs)
            if opts.slim_search_samples is not None:
                X = X[:opts.slim_search_samples]
            for name in names:
                W = ctx.get(name)
                if loaded is None:
                    with ctx.timer.stage("slim_search"):
                        found = ops.slim_search(W, H, X, bits=cfg.wbits, group_size=cfg.group_size)
                    group_bits = np.asarray(found.group_bits)
                    info[name] = {"k": int(found.k), "group_bits": [int(b) for b in group_bits]}
                else:
                    if ctx.index not in loaded or name not in loaded[ctx.index]:
                        raise ValueError(f"{opts.slim_allocation} has no allocation for layer {ctx.index} {name}.")
                    group_bits = np.asarray(loaded[ctx.index][name], dtype=np.int64)
                    info[name] = {"group_bits": [int(b) for b in group_bits]}
                qw = ops.slim_llm(W, H, bits=cfg.wbits, group_bits=group_bits, group_size=cfg.group_size,
                                  percdamp=opts.percdamp, lambda_salience=opts.lambda_salience,
                                  sym_quirk=opts.sym_quirk, salience_damp=opts.salience_damp)
                ctx.set_quantized(name, qw)
                info[name]["loss"] = float(qw.info.get("loss", float("nan")))
            stats[group] = None  # free the kept inputs and the Hessian of this group
            H = X = None
