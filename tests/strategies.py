"""Shared hypothesis strategies and problem builders for the refquant test-suite.

Every method's tests draw their inputs from here, so that a new nasty case added once is exercised
everywhere. Arrays are *built* from a drawn seed and a drawn "kind" rather than drawn element by
element: hypothesis still shrinks (to the simplest kind, the smallest shape, seed 0) and the tests
stay fast enough for the default run.

Kinds of weight matrices (``WEIGHT_KINDS``) and of calibration inputs / Hessians
(``HESSIAN_KINDS``) cover the inputs that break quantizers in practice:

* all-zero rows and all-zero groups (the ``[-1, 1]`` fallback range),
* a huge dynamic range (magnitudes from 1e-6 to 1e4 in one matrix),
* a single outlier input channel (100x the others),
* fp16-magnitude values (up to 65504, handed over as float16 arrays),
* exact rounding ties (multiples of 1/2) and one-signed rows (the symmetric grid's quirk),
* dead input columns (zero diagonal in H), a near-singular H (rank-deficient X plus tiny noise),
  an all-dead H (no calibration signal at all) and a positive diagonal H.

Builders (``make_weight``, ``make_calibration``, ``make_hessian``) are plain functions so that
tests can also use them with fixed seeds outside hypothesis.
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import refquant as rq

FP16_MAX = 65504.0

WEIGHT_KINDS = (
    "normal",
    "zero_rows",
    "zero_group",
    "dynamic_range",
    "outlier_channel",
    "fp16",
    "ties",
    "nonneg",
    "nonpos",
    "constant",
    "all_zero",
)

HESSIAN_KINDS = (
    "well",
    "dead_columns",
    "near_singular",
    "outlier_channel",
    "dynamic_range",
    "fp16",
    "diagonal",
    "diagonal_dead",
    "all_dead",
)

#: Kinds that ``make_calibration`` builds (the Hessian kinds that come from calibration inputs).
CALIBRATION_KINDS = ("well", "dead_columns", "near_singular", "outlier_channel", "dynamic_range", "fp16", "all_dead")

#: Hessian kinds that are positive definite after 1% damping with every column alive.
WELL_POSED_HESSIAN_KINDS = ("well", "outlier_channel", "dynamic_range", "fp16", "diagonal")


def fast(max_examples: int, **kw) -> settings:
    """Hypothesis settings for the default (< 90 s) run: no deadline, no too-slow health check."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **kw,
    )


# --------------------------------------------------------------------------------------------
# Builders (deterministic given the seed)
# --------------------------------------------------------------------------------------------


def make_weight(kind: str, rows: int, cols: int, seed: int, group_size: int | None = None) -> np.ndarray:
    """A (rows, cols) weight matrix of the given kind; float64 except ``"fp16"`` (float16)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 1)
    if kind == "normal":
        pass
    elif kind == "zero_rows":
        mask = rng.random(rows) < 0.5
        mask[rng.integers(rows)] = True  # at least one all-zero row
        W[mask] = 0.0
    elif kind == "zero_group":
        width = group_size if group_size is not None else max(1, cols // 4)
        start = width * int(rng.integers(0, -(-cols // width)))
        W[:, start:start + width] = 0.0
    elif kind == "dynamic_range":
        W = rng.choice([-1.0, 1.0], size=(rows, cols)) * 10.0 ** rng.uniform(-6, 4, size=(rows, cols))
    elif kind == "outlier_channel":
        W[:, rng.integers(cols)] *= 100.0
    elif kind == "fp16":
        W = np.clip(rng.standard_normal((rows, cols)) * 2e4, -FP16_MAX, FP16_MAX)
        W.flat[rng.integers(W.size)] = FP16_MAX * rng.choice([-1.0, 1.0])
        return W.astype(np.float16)
    elif kind == "ties":
        W = rng.integers(-16, 17, size=(rows, cols)) / 2.0
    elif kind == "nonneg":
        W = np.abs(W)
    elif kind == "nonpos":
        W = -np.abs(W)
    elif kind == "constant":
        W = np.full((rows, cols), float(rng.choice([-3.0, -0.25, 0.5, 7.0])))
    elif kind == "all_zero":
        W = np.zeros((rows, cols))
    else:
        raise ValueError(f"unknown weight kind {kind!r}")
    return W


def well_conditioned_x(cols: int, rng: np.random.Generator, n_seq: int = 2, tokens: int | None = None) -> np.ndarray:
    """Correlated Gaussian calibration input (n_seq, tokens, cols) with tokens >= 2 * cols."""
    tokens = tokens if tokens is not None else 2 * cols + 8
    mix = np.eye(cols) + 0.5 * rng.standard_normal((cols, cols)) / np.sqrt(cols)
    return rng.standard_normal((n_seq, tokens, cols)) @ mix


def make_calibration(kind: str, cols: int, seed: int, n_seq: int = 2) -> np.ndarray:
    """Calibration inputs (n_seq, tokens, cols) whose Hessian has the given kind."""
    rng = np.random.default_rng(seed)
    X = well_conditioned_x(cols, rng, n_seq)
    if kind == "well":
        pass
    elif kind == "dead_columns":
        dead = rng.random(cols) < 0.3
        dead[rng.integers(cols)] = True
        X[..., dead] = 0.0
    elif kind == "near_singular":
        rank = max(1, cols // 3)
        Z = rng.standard_normal(X.shape[:-1] + (rank,))
        X = Z @ rng.standard_normal((rank, cols)) + 1e-9 * rng.standard_normal(X.shape)
    elif kind == "outlier_channel":
        X[..., rng.integers(cols)] *= 100.0
    elif kind == "dynamic_range":
        X = X * 10.0 ** rng.uniform(-3, 3, size=cols)
    elif kind == "fp16":
        X = np.clip(X * 2e4, -FP16_MAX, FP16_MAX).astype(np.float16)
    elif kind == "all_dead":
        X = np.zeros_like(X)
    else:
        raise ValueError(f"unknown calibration kind {kind!r}")
    return X


def make_hessian(kind: str, cols: int, seed: int) -> np.ndarray:
    """A (cols, cols) float64 Hessian of the given kind (``refquant.hessian`` of generated X, or
    a constructed diagonal for ``"diagonal"`` / ``"diagonal_dead"``)."""
    if kind in ("diagonal", "diagonal_dead"):
        rng = np.random.default_rng(seed)
        d = 10.0 ** rng.uniform(-2, 2, size=cols)
        if kind == "diagonal_dead":
            dead = rng.random(cols) < 0.3
            dead[rng.integers(cols)] = True
            d[dead] = 0.0
        return np.diag(d)
    return rq.hessian(make_calibration(kind, cols, seed))


def integer_pd_hessian(cols: int, seed: int, spike: int | None = None) -> np.ndarray:
    """A positive definite H with small integer entries (every sum over it is exact in float64,
    so permuting it changes no rounding); ``spike`` gets a diagonal 100x the others."""
    rng = np.random.default_rng(seed)
    A = rng.integers(-3, 4, size=(cols, cols + 4)).astype(np.float64)
    H = A @ A.T + cols * np.eye(cols)
    if spike is not None:
        H[spike, spike] *= 100.0
    return H


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**32 - 1)


@st.composite
def quant_specs(draw, rules=("gptq",), bits=st.integers(1, 8), group_sizes=None, allow_per_tensor=True,
                allow_mse=True, allow_sym=True) -> rq.QuantSpec:
    """A valid :class:`refquant.QuantSpec` with the given rules."""
    rule = draw(st.sampled_from(rules))
    b = draw(bits)
    if rule == "absmax":
        b = max(b, 2)
    gs_strategy = group_sizes if group_sizes is not None else st.one_of(st.none(), st.integers(1, 40))
    gs = draw(gs_strategy)
    per_tensor = gs is None and allow_per_tensor and draw(st.booleans())
    sym = rule == "gptq" and allow_sym and draw(st.booleans())
    mse = rule == "gptq" and allow_mse and draw(st.integers(0, 4)) == 0
    return rq.QuantSpec(bits=b, group_size=gs, sym=sym, per_tensor=per_tensor, mse=mse, rule=rule)


@st.composite
def weights(draw, kinds=WEIGHT_KINDS, max_rows: int = 8, max_cols: int = 48, rows=None, cols=None,
            group_size: int | None = None, dtype=None) -> np.ndarray:
    """A weight matrix of a drawn kind; ``dtype`` (if given) casts it."""
    r = rows if rows is not None else draw(st.integers(1, max_rows))
    c = cols if cols is not None else draw(st.integers(1, max_cols))
    W = make_weight(draw(st.sampled_from(kinds)), r, c, draw(seeds), group_size)
    return W if dtype is None else W.astype(dtype)


@st.composite
def rtn_problems(draw, kinds=WEIGHT_KINDS, rules=("gptq",), max_rows: int = 8, max_cols: int = 48, **spec_kw):
    """``(W, spec)`` for RTN: a drawn spec and a weight of a drawn kind (groups aligned to it)."""
    spec = draw(quant_specs(rules=rules, **spec_kw))
    W = draw(weights(kinds=kinds, max_rows=max_rows, max_cols=max_cols, group_size=spec.group_size))
    return W, spec


@st.composite
def hessians(draw, cols: int, kinds=HESSIAN_KINDS) -> np.ndarray:
    """A (cols, cols) Hessian of a drawn kind."""
    return make_hessian(draw(st.sampled_from(kinds)), cols, draw(seeds))


@st.composite
def gptq_problems(draw, weight_kinds=WEIGHT_KINDS, hessian_kinds=HESSIAN_KINDS, max_rows: int = 6,
                  max_cols: int = 40, **spec_kw) -> dict:
    """Keyword arguments for ``refquant.gptq``: W, H, spec, blocksize, percdamp, act_order,
    static_groups (only drawn True when the spec has a group_size)."""
    spec = draw(quant_specs(**spec_kw))
    cols = draw(st.integers(1, max_cols))
    W = draw(weights(kinds=weight_kinds, max_rows=max_rows, cols=cols, group_size=spec.group_size))
    H = draw(hessians(cols, kinds=hessian_kinds))
    return dict(
        W=W,
        H=H,
        spec=spec,
        blocksize=draw(st.sampled_from([1, 3, 8, 128])),
        percdamp=draw(st.sampled_from([0.01, 0.1])),
        act_order=draw(st.booleans()),
        static_groups=spec.group_size is not None and draw(st.booleans()),
    )
