"""AWQ's wiring unit: options, the layer-level method (llm-awq ``run_awq``), golden suite, preset, study rows.

The spec is ``refquant/spec/awq.py`` (scale and clip searches, LLaMA scaling groups) and
``refquant/spec/equalize.py`` (folding); the twins are the backends'
:class:`~refquant.backends.protocols.AWQOps`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from array_api_compat import array_namespace

from ..backends.protocols import AWQOps, PipelineOps, QuantOps
from ..golden import GoldenSuite, calibration_input, f64, outputs_of, rounding_tie, spec_of
from ..pipeline import Method, Options, QuantConfig, register
from ..spec import awq, llama
from ..spec.awq import CLIP_MAX_SHRINK, CLIP_N_GRID, CLIP_N_SAMPLE_TOKENS, CLIPPED, LLAMA_GROUPS, N_GRID, ScalingGroup
from ..spec.quantizer import QuantSpec, group_slices


@dataclass(frozen=True)
class AWQOptions(Options):
    """AWQ's settings; defaults of mit-han-lab/llm-awq HEAD (``run_awq``: scales and clipping)."""

    duo_scaling: bool = field(default=False, metadata={
        "help": "the first release's scale formula x_mean^r / w_mean^(1-r) (HEAD: x_mean^r)"})
    awq_clip: bool = field(default=True, metadata={"help": "search the weight clipping (auto_clip)"})
    awq_search_samples: int | None = field(default=None, metadata={
        "help": "replay only the first N calibration sequences in the attention/MLP scale searches (a speed "
                "budget, not the original's protocol; default: all)", "metavar": "N"})

    def __post_init__(self):
        n = self.awq_search_samples
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"awq_search_samples must be a positive int (calibration sequences) or None (all); got {n!r}.")


@runtime_checkable
class AWQOpsForPipeline(AWQOps, PipelineOps, QuantOps, Protocol):
    """What the layer-level AWQ calls."""


def _cat(parts):
    return array_namespace(*parts).concat(parts, axis=0)


def _copy(x):
    return array_namespace(x).asarray(x, copy=True)


def _shape(W) -> tuple[int, ...]:
    return tuple(int(d) for d in W.shape)


# --------------------------------------------------------------------------------------------- golden

SHAPES = ("llama4096", "odd1000", "nasty256")


def golden_cases():
    for shape in SHAPES:
        configs = [(4, 128, False, 512), (3, 128, False, 100), (3, None, False, 512)]
        if shape != "nasty256":  # its all-zero row and group make the first-release formula 0/0 (a ValueError)
            configs.append((4, 128, True, 512))
        for bits, gs, duo, n_tok in configs:
            params = {"spec": {"bits": bits, "group_size": gs, "rule": "awq"}, "n_grid": 20, "duo_scaling": duo,
                      "clip_n_grid": 20, "clip_n_sample_tokens": n_tok}
            name = (f"{shape}_w{bits}_{'g' + str(gs) if gs else 'perchannel'}{'_duo' if duo else ''}"
                    f"{'_sample' + str(n_tok) if n_tok != 512 else ''}")
            yield shape, name, params, False


def golden_rule(params: dict) -> dict:
    return {"exact": ["best_k", "codes", "g_idx"],
            "bitwise": ["scales", "losses", "clip_max_val", "clip_losses", "scale", "zero"],
            "bitwise_everywhere": False, "cross_platform_rtol": 1e-9,
            "text": "chosen ratio and codes identical everywhere; floats bit for bit on the generating platform, "
                    "within rtol 1e-9 where NumPy/BLAS/CPU differ (matmul order in the losses)"}


PARITY_RULE = {
    "loss_rtol": 1e-10,
    "scales_rtol": 1e-12,
    "min_clip_identical": 0.99,
    "clip_err_rtol": 1e-10,
    "tie_eps": 1e-5,
    "w_hat_ulps": 4,
    "text": "the searches run in float64 on every backend: every grid loss within loss_rtol of the reference's; "
            "the chosen ratio is the reference's, or its reference loss is within loss_rtol of the minimum (a "
            "near tie). With the same ratio: scales within scales_rtol; with bit-identical scales >= min_clip_identical of "
            "the (row, group) clip candidates identical; every other one a near tie (reference clip error within "
            "clip_err_rtol of the reference's choice) or, where the scales differ in last bits (a sum in another "
            "order flips exact zero-point ties of single candidates), the reference's choice (or a near tie) on "
            "the backend's own scaled inputs. Final float32 RTN, where the clip agrees: signed codes q - zero identical "
            "except at rounding ties (tie_eps, then off by 1), the zero point equal or, where the reference's "
            "was an exact tie (a symmetric clip gives zero = round(maxq / 2)), off by 1; W_hat within w_hat_ulps "
            "float32 ulps",
}


def golden_run(params: dict, arrays: dict, ops, to_device, to_numpy) -> dict:
    """Scale search with the linear block, ``W diag(s)``, clip search on ``X diag(s)^-1``, clip, RTN."""
    X, W, spec = calibration_input(arrays), arrays["W"], spec_of(params)
    res = ops.awq_search_scale(to_device(X), [to_device(W)], spec, None, n_grid=params["n_grid"],
                               duo_scaling=params["duo_scaling"])
    s = f64(to_numpy(res.scales))
    W_s = ops.scale_weight(to_device(W), res.scales)
    clip = ops.awq_search_clip(to_device(X / s), W_s, spec, n_grid=params["clip_n_grid"],
                               n_sample_tokens=params["clip_n_sample_tokens"])
    qw = ops.rtn(ops.apply_clip(W_s, clip.max_val, spec.group_size), spec)
    out = outputs_of(qw, to_numpy)
    out.update(scales=s, best_k=np.asarray(int(round(res.best_ratio * params["n_grid"]))), losses=f64(res.losses),
               clip_max_val=f64(to_numpy(clip.max_val)), clip_losses=f64(to_numpy(clip.losses)))
    return out


def golden_compare(case, arrays, expected, got, rule) -> dict:
    rtol = rule["loss_rtol"]
    le, lg = expected["losses"], f64(got["losses"])
    report = {"losses_max_rel_diff": float(np.max(np.abs(lg - le) / np.maximum(np.abs(le), 1e-300)))}
    ke, kg = int(expected["best_k"]), int(got["best_k"])
    report["best_k"] = (ke, kg)
    ratio_ok = kg == ke or le[kg] <= le[ke] * (1 + rtol)
    ok = report["losses_max_rel_diff"] <= rtol and ratio_ok
    if kg == ke:  # the same scale: then the clip search and the final codes are comparable
        report["scales_max_rel_diff"] = float(np.max(np.abs(f64(got["scales"]) - expected["scales"]) / expected["scales"]))
        ok = ok and report["scales_max_rel_diff"] <= rule["scales_rtol"]
        cl, me, mg = expected["clip_losses"], expected["clip_max_val"], f64(got["clip_max_val"])
        W_s = arrays["W"] * expected["scales"][None, :]
        spec = spec_of(case.params)

        org = np.stack([np.abs(W_s[:, c]).max(axis=1) for c in group_slices(W_s.shape[1], spec.group_size)], axis=1)
        n_grid = case.params["clip_n_grid"]
        with np.errstate(divide="ignore", invalid="ignore"):
            i_g = np.where(org > 0, np.rint((1 - mg / np.where(org > 0, org, 1)) * n_grid), 0).astype(np.int64)
            i_e = np.where(org > 0, np.rint((1 - me / np.where(org > 0, org, 1)) * n_grid), 0).astype(np.int64)
        i_g = np.clip(i_g, 0, cl.shape[0] - 1)
        same_clip = i_g == i_e  # the same candidate (the thresholds themselves differ in the last bits)
        rows, groups = np.indices(me.shape)
        err_g, err_e = cl[i_g, rows, groups], cl[i_e, rows, groups]
        near = same_clip | (err_g <= err_e * (1 + rule["clip_err_rtol"]))
        s_got = f64(got["scales"])
        if not near.all() and not np.array_equal(s_got, expected["scales"]):
            # The backend's scales are the reference's up to last-bit differences (x_mean is a sum in another
            # order), so its W diag(s) differs in last bits, which can flip an exact zero-point tie inside one
            # clip candidate. Judge those choices by the reference run on the backend's own scaled inputs.
            W_g = arrays["W"] * s_got[None, :]
            redo = awq.search_clip(calibration_input(arrays) / s_got, W_g, spec, n_grid=n_grid,
                                   n_sample_tokens=case.params["clip_n_sample_tokens"])
            with np.errstate(divide="ignore", invalid="ignore"):
                i_r = np.where(org > 0, np.rint((1 - redo.max_val / np.where(org > 0, org, 1)) * n_grid), 0)
            i_r = i_r.astype(np.int64)
            i_r = np.clip(i_r, 0, cl.shape[0] - 1)
            err_gr, err_r = redo.losses[i_g, rows, groups], redo.losses[i_r, rows, groups]
            rechecked = ~near & ((i_g == i_r) | (err_gr <= err_r * (1 + rule["clip_err_rtol"])))
            report["clip_explained_by_backend_scales"] = int(rechecked.sum())
            near = near | rechecked
        report["clip_identical_fraction"] = float(same_clip.mean())
        report["clip_off_near_ties"] = int((~near).sum())
        # identical scales: nearly every clip choice identical; scales off in last bits (a sum in another order):
        # every differing choice must be the reference's on the backend's own scaled inputs (checked above)
        same_scales = np.array_equal(s_got, expected["scales"])
        ok = (ok and report["clip_off_near_ties"] == 0
              and (report["clip_identical_fraction"] >= rule["min_clip_identical"] or not same_scales))
        # final codes, on the (row, group)s whose clip agrees. A clip below both extremes of a group
        # makes llm-awq's zero point round(-(-m) / (2m / maxq)) = round(maxq / 2) an exact tie, which
        # float32 and float64 resolve either way: compare the signed codes q - z (what W_hat is made of)
        # and allow the zero point to differ by one where the reference's was such a tie.
        g_idx = expected["g_idx"]
        W_c = np.clip(W_s, -me[:, g_idx], me[:, g_idx])
        ze, zg = expected["zero"], f64(got["zero"])
        xmin = np.stack([W_c[:, c].min(axis=1) for c in group_slices(W_c.shape[1], spec.group_size)], axis=1)
        zero_tie = rounding_tie(-xmin / expected["scale"], rule["tie_eps"])
        zero_ok = (ze == zg) | (zero_tie & (np.abs(ze - zg) <= 1)) | ~same_clip
        qe = expected["codes"].astype(np.int64) - ze[:, g_idx].astype(np.int64)
        qg = got["codes"].astype(np.int64) - zg[:, g_idx].astype(np.int64)
        tie = rounding_tie(W_c / expected["scale"][:, g_idx], rule["tie_eps"])
        agree = same_clip[:, g_idx]
        off = agree & (qe != qg) & ~(tie & (np.abs(qe - qg) <= 1))
        Wh_e = expected["scale"][:, g_idx] * qe
        tol = rule["w_hat_ulps"] * np.finfo(np.float32).eps * np.maximum(np.abs(Wh_e), expected["scale"][:, g_idx])
        report["codes_identical_fraction"] = float((expected["codes"] == got["codes"]).mean())
        report["signed_codes_identical_fraction"] = float((qe == qg).mean())
        report["zero_tie_flips"] = int((ze != zg).sum())
        report["zero_off_ties"] = int((~zero_ok).sum())
        report["codes_differing_off_ties"] = int(off.sum())
        report["w_hat_beyond_fp32_rounding"] = int((agree & (qe == qg) & (np.abs(Wh_e - f64(got["W_hat"])) > tol)).sum())
        ok = (ok and report["zero_off_ties"] == 0 and report["codes_differing_off_ties"] == 0
              and report["w_hat_beyond_fp32_rounding"] == 0)
    report["ok"] = bool(ok)
    return report


# --------------------------------------------------------------------------------------------- the method


@register
class AWQ(Method):
    """AWQ on one LLaMA decoder layer (``run_awq``: ``auto_scale_block``, ``apply_scale``,
    ``auto_clip_block``, ``apply_clip``, then ``pseudo_quantize_model_weight``).

    1. One calibration pass through the FP layer keeps the inputs of the norm-fed groups (q/k/v,
       gate/up: their search compares the whole attention / MLP) and the statistics the backend
       needs for the single-linear groups (``ops.awq_linear_stats()``: the inputs for the
       reference; Gram + mean |x| for torch, which never keeps the 4x wider ``down_proj`` input).
    2. Every scaling group of :data:`LLAMA_GROUPS` is searched on the unmodified layer
       (:func:`search_scale`, ``options.duo_scaling`` picks the formula); ``v_proj -> o_proj`` only
       when the two weights have the same shape (skipped under GQA, as the original).
    3. All scales are applied (norm ``gamma / s`` or previous linear's rows ``/ s``; columns ``* s``).
    4. ``options.awq_clip``: one more pass through the scaled (still FP) layer keeps ~512 strided
       tokens of each input -- exactly the tokens :func:`search_clip` samples, so the inputs are the
       original's ``X / s`` -- and v/o/gate/up/down are clipped (:func:`search_clip`, :func:`apply_clip`).
    5. Every linear is quantized with ``QuantSpec(wbits, group_size, rule="awq")`` (RTN).

    Next-layer inputs come from the FP layer (``propagate = "fp"``), as in the original.
    ``options.awq_search_samples`` (opt-in, not the original's protocol) replays only the first that
    many calibration sequences in the attention / MLP searches -- the bulk of the cost.
    """

    name = "awq"
    Options = AWQOptions
    ops = AWQOpsForPipeline
    touches = llama.LINEARS + llama.NORMS + tuple(g.prev + ".bias" for g in LLAMA_GROUPS if not g.prev_is_norm)
    statistics = ("inputs", "H", "mean_abs")  # the torch twin searches single linears on the Gram
    propagate = "fp"
    suites = ("equalization",)
    golden = (GoldenSuite("awq", golden_cases, golden_rule, PARITY_RULE, golden_run, golden_compare),)
    preflight = ("awq", "rtn")
    bench_preset = {"wbits": 4, "group_size": 128}
    bench_default = True

    def validate(self, config) -> None:
        if config.sym:
            raise ValueError("awq: llm-awq's quantizer is asymmetric only (zero_point=True; its symmetric branch does "
                             "not run); drop --sym.")
        if config.abits != 16:
            raise ValueError(f"awq is weight-only; got abits={config.abits}. Use --abits 16 (or smoothquant/aweq for "
                             "activation quantization).")

    def weight_spec(self, config) -> QuantSpec:
        """llm-awq ``pseudo_quantize_tensor`` (zero point, raw group min/max) with ``wbits``/``group_size``."""
        return QuantSpec(bits=config.wbits, group_size=config.group_size, rule="awq")

    def study_rows(self, suite: str) -> list:
        """Equalization suite: AWQ against its RTN baseline at w4 and w3, g128."""
        if suite != "equalization":
            return []
        return [(f"{m}_w{b}_g128", m.upper(), QuantConfig.of(m, wbits=b, group_size=128))
                for b in (4, 3) for m in ("rtn", "awq")]

    @staticmethod
    def groups(ctx) -> list:
        """The scaling groups applied to this layer (``v_proj -> o_proj`` only without GQA)."""
        same = _shape(ctx.get(llama.V)) == _shape(ctx.get(llama.O))
        return [g for g in LLAMA_GROUPS if g.input != "o_in" or same]

    def quantize_layer(self, ctx) -> None:
        cfg, opts, ops = ctx.config, ctx.config.options, ctx.ops
        spec = cfg.weight_spec()
        groups = self.groups(ctx)
        info = ctx.info.setdefault("awq", {"groups": {}, "v_to_o": any(g.input == "o_in" for g in groups)})
        n_sequences = int(ctx.inputs.shape[0])
        chunk = getattr(ctx.runner, "batch_size", None)

        # 1-2. search every group on the FP layer
        stats = ctx.collect(self.first_statistics(ctx))
        scales = {}
        for g in groups:
            Ws = [ctx.get(n) for n in g.linears]
            if g.block is not None:
                X = stats[g.input].inputs
                if opts.awq_search_samples is not None and opts.awq_search_samples < int(X.shape[0]):
                    X = _copy(X[:opts.awq_search_samples])  # opt-in search budget (not the original's protocol)
                    info["search_sequences"] = int(X.shape[0])
                stats[g.input] = None  # only the concatenated inputs stay alive during the search
                res = ops.awq_search_scale(X, Ws, spec, block=self._block(ctx, g), n_grid=N_GRID,
                                           duo_scaling=opts.duo_scaling, chunk=chunk)
                del X
            else:
                res = ops.awq_search_scale_stats(stats[g.input], Ws, spec, n_grid=N_GRID, duo_scaling=opts.duo_scaling,
                                                 n_sequences=n_sequences)
                stats[g.input] = None
            scales[g.input] = res.scales
            info["groups"][g.input] = {"ratio": float(res.best_ratio), "loss": float(res.best_loss),
                                       "loss_ratio0": float(res.losses[0]),
                                       "losses": [float(v) for v in res.losses]}
        del stats

        # 3. apply all scales
        for g in groups:
            s = scales[g.input]
            if g.prev_is_norm:
                ctx.set(g.prev, ops.fold_into_norm(ctx.get(g.prev), s))
            else:
                W_prev, b_prev = ops.fold_into_linear(ctx.get(g.prev), s, ctx.get(g.prev + ".bias"))
                ctx.set(g.prev, W_prev)
                if b_prev is not None:
                    ctx.set(g.prev + ".bias", b_prev)
            for n in g.linears:
                ctx.set(n, ops.scale_weight(ctx.get(n), s))

        # 4. clip search on X / s (a pass through the scaled FP layer)
        if opts.awq_clip and not spec.per_tensor:
            inputs = sorted({llama.INPUT_OF[n] for n in CLIPPED}, key=list(llama.INPUT_LINEARS).index)
            X_sub = self.sampled_inputs(ctx, {g: llama.INPUT_LINEARS[g][0] for g in inputs}, CLIP_N_SAMPLE_TOKENS)
            info["clip_tokens"] = {g: int(X.shape[0]) for g, X in X_sub.items()}
            for n in CLIPPED:
                X = X_sub[llama.INPUT_OF[n]]
                res = ops.awq_search_clip(X, ctx.get(n), spec, n_grid=CLIP_N_GRID, max_shrink=CLIP_MAX_SHRINK,
                                          n_sample_tokens=int(X.shape[0]))  # X is already the strided sample
                ctx.set(n, ops.apply_clip(ctx.get(n), res.max_val, spec.group_size))
            del X_sub

        # 5. RTN with the AWQ quantizer
        for n in llama.LINEARS:
            ctx.set_quantized(n, ops.rtn(ctx.get(n), spec))

    def first_statistics(self, ctx) -> dict:
        """What the scale searches need from the FP layer: kept inputs of the norm-fed groups (their
        compared module is the whole attention / MLP), the backend's statistics for single linears."""
        return {g.input: ("inputs",) if g.block else tuple(ctx.ops.awq_linear_stats()) for g in self.groups(ctx)}

    @staticmethod
    def _block(ctx, g: ScalingGroup):
        names = g.linears

        def block(X, weights):
            return ctx.runner.block(ctx.layer, g.block, X, dict(zip(names, weights)))

        return block

    @staticmethod
    def sampled_inputs(ctx, first_linear: dict, n_sample_tokens: int) -> dict:
        """Run the layer as it is now and keep, per input group, the tokens ``search_clip`` samples.

        ``first_linear`` maps a group to the linear whose input is recorded. Tokens are counted in
        the order of the concatenated calibration inputs (sequence by sequence), and token ``t`` is
        kept iff ``t % stride == 0`` with ``stride = max(1, N // n_sample_tokens)`` -- the rows
        ``X.reshape(-1, C)[0::stride]`` of the reference -- so at most ~``n_sample_tokens`` rows per
        group are ever kept.
        """
        n_tokens = int(ctx.inputs.shape[0]) * int(ctx.inputs.shape[1])
        stride = max(1, n_tokens // int(n_sample_tokens))
        wanted = {name: group for group, name in first_linear.items()}
        kept = {g: [] for g in first_linear}
        seen = {g: 0 for g in first_linear}

        def on_input(name, x):
            g = wanted.get(name)
            if g is not None:
                flat = x.reshape(-1, x.shape[-1])
                start = (-seen[g]) % stride
                kept[g].append(_copy(flat[start::stride]))
                seen[g] += int(flat.shape[0])
            return x

        hooks = llama.LinearHooks(on_input=on_input)
        with ctx.timer.stage("calibration_forward"):
            ctx.runner.forward(ctx.layer, ctx.inputs, hooks, keep_output=False,  # no output buffer,
                               stop_after=max(wanted, key=llama.LINEARS.index, default=None))  # nothing after the last input
        return {g: _cat(parts) for g, parts in kept.items()}
