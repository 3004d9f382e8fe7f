"""QuIP: incoherence processing (random orthogonal rotations, rescale) and LDLQ adaptive rounding.

Chee, Cai, Kuleshov, De Sa, "QuIP: 2-Bit Quantization of Large Language Models With Guarantees",
NeurIPS 2023 (arXiv:2307.13304). Faithful to Cornell-RelaxML/QuIP at commit
ac92cfc7a22f6100009e2caf53bb72257d3f3184 (``method.py`` ``QuantMethod.preproc`` / ``postproc`` and the
butterfly constructions, ``quant.py`` ``qfn='b'``, ``vector_balance.py`` ``quantize_weight_vecbal`` /
``round_ldl``, ``near.py``, ``bal.py``; the flags of ``opt.py``):

* eq. (1), the proxy loss ``l(W_hat) = tr((W_hat - W) H (W_hat - W)^T)``;
* Algorithm 1 (incoherence pre-processing), in the code's order:
  1. rescale (``--pre_rescale``): ``H <- H / max|H|``; ``t = (max(diag H, 1e-8) / max(diag W^T W,
     1e-8))^(1/4)``, clamped ``>= 1e-8``; ``W <- W diag(t)``, ``H <- diag(t)^-1 H diag(t)^-1``;
  2. projection (``--pre_proj``): ``H <- H * n / (tr H + 1e-8) + 0.01 I``; ``W <- U W V^T``,
     ``H <- V H V^T`` with random orthogonal ``U`` (out_features) and ``V`` (in_features);
  3. GPTQ's H modification (``--pre_gptqH``): dead diagonal -> 1 and ``W[:, dead] = 0``;
     ``H += percdamp * mean(diag H) I``;
* the random orthogonal matrices (:func:`random_rotation`): ``P_out S_2 S_1 P_in`` with
  ``n = p1 p2`` (sorted prime factors of n split alternately), Haar rotations of size p1 and p2
  applied along the two axes of the reshaped vector, random input/output permutations. The
  committed ``--incoh_processing`` sets ``args.proj_extra = 1`` but the code reads
  ``args.pre_proj_extra`` (default 0): what runs is the *blocked* butterfly (an independent
  rotation per slice), which is ``incoherence=True`` here; ``incoherence="kron"`` is the paper's
  Kronecker product ``U_L (x) U_R`` (Sec. 4, "Efficient incoherence", ``pre_proj_extra=1``);
* the incoherent quantizer (``qfn='b'``): ``s = 2.4 * RMS(W) + 1e-16`` of the whole projected
  matrix; ``2**bits`` evenly spaced levels covering ``[-s, s]``;
* eq. (2) / Sec. 3 (LDLQ, ``round_ldl``): ``H = (L + I) D (L + I)^T`` (L strictly lower, from
  the Cholesky factor with unit diagonal); columns from last to first,
  ``w_hat_i = clamp(floor(w_i + (w_{>i} - w_hat_{>i}) L_{>i,i} + 1/2), 0, maxq)`` on the clamped
  grid coordinates ``w = clamp((W / s + 1) / 2 * maxq, 0, maxq)``; greedy passes (the paper's
  greedy local search after LDLQ, ``n_greedy_passes``) as the code does them;
* ``docs/methods/quip.md`` numbers these steps (Q1)-(Q9) and notes that the paper's equation numbers
  were not checked against a local copy (the PDF is not in ``../shared/docs/papers/``);
* ``rounding="nearest"`` (``near.py``): round half to even, clamp after;
* Algorithm 2 (post-processing): ``W_hat <- U^T W_hat V``, then ``W_hat <- W_hat diag(t)^-1``.

Where the code and the paper differ, refquant follows the code and offers the paper's variant as a
switch; ``docs/methods/quip.md`` lists every difference. The random draws use a private
``numpy.random.Generator`` seeded with ``seed`` (the original uses the unseeded global torch/scipy
RNG): the global RNG is never touched.
"""
from __future__ import annotations

import math

import numpy as np

from ._checks import check_matrix, check_square
from .formats import QuipWeight, butterfly_apply

#: The incoherent quantizer's range factor ``s = RHO * RMS(W)`` (``quant.py``: ``2.4 * x.square().mean().sqrt()``).
RHO = 2.4

#: ``incoherence`` values: what each builds (None: no projection).
INCOHERENCE = {True: "blocked", "blocked": "blocked", "kron": "kron", "blocked_nopermute": "blocked_nopermute",
               False: None}

ROUNDINGS = ("ldlq", "nearest")


class HessianNotPositiveDefinite(ValueError):
    """The pre-processed H has no Cholesky factor (LDLQ needs one)."""


# --------------------------------------------------------------------------------------------- rotations


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` in ascending order, with multiplicity (``primefac.primefac`` for small factors)."""
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def butterfly_factors(n: int) -> tuple[int, int]:
    """``(p1, p2)``: products of the sorted prime factors of ``n`` at even and at odd positions
    (``method.butterfly_factors``): 4096 -> (64, 64), 11008 -> (688, 16), 14336 -> (64, 224); a
    prime n gives ``(n, 1)``."""
    pf = prime_factors(int(n))
    return math.prod(pf[0::2]), math.prod(pf[1::2])


def haar_rotations(rng: np.random.Generator, m: int, p: int) -> np.ndarray:
    """``m`` independent Haar-distributed rotations of size ``p`` (det +1), shape (m, p, p).

    ``method.gen_rand_orthos``: ``p == 2`` is ``[[cos t, sin t], [-sin t, cos t]]`` with ``t``
    uniform in ``[0, 2 pi)``; otherwise Haar on SO(p) (the original: ``scipy.stats.special_ortho_group``;
    here the QR of a Gaussian matrix with the signs of ``diag R`` taken out (Mezzadri 2007), the
    first column negated where the determinant is -1 -- the same distribution, drawn from ``rng``).
    ``p == 1``: the identity (SO(1) has one element; the original fails there).
    """
    if p == 1:
        return np.ones((m, 1, 1))
    if p == 2:
        t = rng.random(m) * (2 * math.pi)
        c, s = np.cos(t), np.sin(t)
        X = np.empty((m, 2, 2))
        X[:, 0, 0], X[:, 1, 1], X[:, 0, 1], X[:, 1, 0] = c, c, s, -s
        return X
    G = rng.standard_normal((m, p, p))
    Q, R = np.linalg.qr(G)
    d = np.sign(np.diagonal(R, axis1=1, axis2=2))
    d[d == 0] = 1
    Q = Q * d[:, None, :]
    neg = np.linalg.det(Q) < 0
    Q[neg, :, 0] *= -1
    return Q


def random_rotation(rng: np.random.Generator, n: int, kind: str = "blocked") -> tuple:
    """The factors ``(perm_in, perm_out, R1, R2)`` of a random orthogonal ``n x n`` matrix
    (:func:`refquant.spec.formats.butterfly_apply`), drawn from ``rng`` in the original's order:
    the rotations of ``p1``, those of ``p2``, then ``perm_in``, then ``perm_out``.

    ``kind``: ``"blocked"`` (``gen_rand_ortho_butterfly``, ``pre_proj_extra=0``: n/p independent
    rotations per factor, what runs), ``"kron"`` (``..._noblock``, ``pre_proj_extra=1``: one
    rotation per factor, ``P_out (R1 (x) R2) P_in`` up to the index order: the paper's form),
    ``"blocked_nopermute"`` (``..._nopermute``, ``pre_proj_extra=2``: identity permutations).
    """
    if kind not in ("blocked", "kron", "blocked_nopermute"):
        raise ValueError(f"rotation kind must be 'blocked', 'kron' or 'blocked_nopermute'; got {kind!r}.")
    p1, p2 = butterfly_factors(n)
    R1 = haar_rotations(rng, 1 if kind == "kron" else n // p1, p1)
    R2 = haar_rotations(rng, 1 if kind == "kron" else n // p2, p2)
    if kind == "blocked_nopermute":
        perm_in, perm_out = np.arange(n), np.arange(n)
    else:
        perm_in, perm_out = rng.permutation(n), rng.permutation(n)
    return perm_in.astype(np.int64), perm_out.astype(np.int64), R1, R2


def dense_factors(U: np.ndarray) -> tuple:
    """A dense orthogonal ``U`` as butterfly factors (``p1 = n``, ``p2 = 1``, identity permutations)."""
    n = U.shape[0]
    return np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64), np.asarray(U, dtype=np.float64)[None], np.ones((n, 1, 1))


def rotation_matrix(factors) -> np.ndarray:
    """The dense matrix of butterfly factors (``B = B @ I``)."""
    n = int(factors[0].shape[0])
    return butterfly_apply(*factors, np.eye(n))


def check_orthogonal(U, n: int, name: str, tol: float = 1e-6) -> np.ndarray:
    check_square(U, n, name)
    U = np.asarray(U, dtype=np.float64)
    dev = float(np.max(np.abs(U @ U.T - np.eye(n))))
    if dev > tol:
        raise ValueError(f"{name} must be orthogonal ({name} {name}^T = I); max |{name} {name}^T - I| = {dev:.3e} > {tol:g}. "
                         "Pass an orthogonal matrix, or None to draw a random one from seed.")
    return U


# --------------------------------------------------------------------------------------------- pieces


def diagonal_rescale(W: np.ndarray, H: np.ndarray):
    """Algorithm 1's diagonal rescale as ``QuantMethod.preproc`` does it: returns ``(W, H, t)``.

    An all-zero H (no calibration signal) is left as it is instead of divided by ``max|H| = 0``
    (the original would produce NaN); ``t`` is then ``(1e-8 / diag W^T W)^(1/4)``.
    """
    hmax = np.max(np.abs(H))
    H = H / hmax if hmax > 0 else H.copy()
    dH = np.maximum(np.diag(H), 1e-8)
    dW = np.maximum(np.einsum("ij,ij->j", W, W), 1e-8)
    t = np.maximum(np.sqrt(np.sqrt(dH / dW)), 1e-8)
    W = W * t[None, :]
    H = H / t[None, :]
    H = H / t[:, None]
    return W, H, t


def incoherent_scale(W: np.ndarray) -> float:
    """``s = 2.4 * RMS(W) + 1e-16`` over the whole matrix (``quant.py`` ``qfn='b'``)."""
    return float(RHO * np.sqrt(np.mean(np.square(W))) + 1e-16)


def grid_coordinates(W: np.ndarray, scale: float, maxq: int) -> np.ndarray:
    """``((W / s + 1) / 2) * maxq``: W in grid units (``0`` is ``-s``, ``maxq`` is ``+s``), not clamped."""
    return ((W / scale + 1) / 2) * maxq


def ldl_factor(H: np.ndarray) -> np.ndarray:
    """The strictly lower ``L`` of ``H = (L + I) D (L + I)^T`` (``round_ldl``: Cholesky, columns / diagonal, minus I)."""
    try:
        C = np.linalg.cholesky(H)
    except np.linalg.LinAlgError:
        raise HessianNotPositiveDefinite(
            f"the pre-processed Hessian ({H.shape[0]}x{H.shape[1]}) is not positive definite, so LDLQ has no LDL "
            "factor. Use more calibration data, raise percdamp, or keep incoherence=True (it adds 0.01 I)."
        ) from None
    L = C * (1 / np.diag(C))[None, :]
    return L - np.eye(H.shape[0])


def ldlq(w: np.ndarray, H: np.ndarray, maxq: int) -> np.ndarray:
    """LDLQ (``round_ldl`` without passes): grid coordinates ``w`` (rows, d), clamped, -> integer codes (float).

    Columns from last to first: ``w_hat_i = clamp(floor(w_i + (w_{i:} - w_hat_{i:}) L_{i:,i} + 1/2), 0, maxq)``.
    """
    LT = np.ascontiguousarray(ldl_factor(H).T)  # LT[i, i:] = L[i:, i], contiguous
    w_hat = w.copy()
    for i in reversed(range(w.shape[1])):
        w_hat[:, i] = np.clip(np.floor(w[:, i] + (w[:, i:] - w_hat[:, i:]) @ LT[i, i:] + 0.5), 0, maxq)
    return w_hat


def greedy_passes(w: np.ndarray, w_hat: np.ndarray, H: np.ndarray, maxq: int, npasses: int) -> tuple[np.ndarray, int]:
    """``round_ldl``'s greedy passes: coordinate descent on the proxy loss, columns last to first.

    With ``H <- H / max(diag H)`` and the residual ``s = w_hat - w``: per column
    ``eps = wr_i - round(wr_i - (s H_{:,i}) / H_ii)`` (half to even, no clamp), ``wr_i -= eps``,
    ``s_i -= eps``; after the pass ``wr`` is clamped to ``[0, maxq]`` -- and ``s`` is *not*
    refreshed, as in the code, which changes codes from the second pass on. Stops early when a
    pass changes nothing. Returns ``(codes, passes_run)``.
    """
    w_hat = w_hat.copy()
    wr = w_hat.copy()
    s = w_hat - w
    H = H / np.max(np.diag(H))
    run = 0
    for _ in range(npasses):
        run += 1
        for i in reversed(range(w.shape[1])):
            Hs = s @ H[:, i]
            eps = wr[:, i] - np.rint(wr[:, i] - Hs / H[i, i])
            wr[:, i] -= eps
            s[:, i] -= eps
        wr = np.clip(wr, 0, maxq)
        if np.array_equal(w_hat, wr):
            break
        w_hat = wr.copy()
    return wr, run


def proxy_loss(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> float:
    """Eq. (1): ``tr((W_hat - W) H (W_hat - W)^T)``."""
    D = W_hat - W
    return float(np.einsum("ij,jk,ik->", D, H, D))


# --------------------------------------------------------------------------------------------- checks


def check_quip_args(bits, seed, rescale, incoherence, rounding, npasses, percdamp) -> None:
    """The arguments of :func:`quip` besides W, H, U, V (the backends check them here too)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16 (QuIP's tables: 2, 3, 4); got {bits!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0 (it seeds the random rotations); got {seed!r}.")
    if not isinstance(rescale, (bool, np.bool_)):
        raise ValueError(f"rescale must be True or False; got {rescale!r}.")
    if not any(incoherence is k or (isinstance(k, str) and incoherence == k) for k in INCOHERENCE):
        raise ValueError(f"incoherence must be True (the blocked butterfly that runs), 'kron' (the paper's Kronecker "
                         f"form), 'blocked', 'blocked_nopermute' or False; got {incoherence!r}.")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}.")
    if isinstance(npasses, bool) or not isinstance(npasses, (int, np.integer)) or npasses < 0:
        raise ValueError(f"npasses must be an integer >= 0 (greedy passes after LDLQ); got {npasses!r}.")
    if npasses and rounding != "ldlq":
        raise ValueError("greedy passes (npasses > 0) follow LDLQ only (round_ldl); the nearest path has none.")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float, np.floating)) or not percdamp >= 0:
        raise ValueError(f"percdamp must be a number >= 0 (a fraction of mean(diag H)); got {percdamp!r}.")


def rotation_kind(incoherence) -> str | None:
    for k, v in INCOHERENCE.items():
        if incoherence is k or (isinstance(k, str) and incoherence == k):
            return v
    raise ValueError(f"unknown incoherence {incoherence!r}")


def draw_rotations(rows: int, cols: int, seed: int, kind: str | None, U=None, V=None):
    """``(U_factors, V_factors, seed_used)``: U (out side) drawn first, then V, from one private
    generator seeded with ``seed`` (as the original draws U before V); a given dense U/V replaces its
    draw (the other side is still drawn as if both were). ``kind`` None: no rotation."""
    if kind is None:
        if U is not None or V is not None:
            raise ValueError("U / V were given but incoherence=False: pass incoherence=True to use them.")
        return None, None, None
    rng = np.random.default_rng(seed)
    Uf = random_rotation(rng, rows, kind)
    Vf = random_rotation(rng, cols, kind)
    if U is not None:
        Uf = dense_factors(check_orthogonal(U, rows, "U"))
    if V is not None:
        Vf = dense_factors(check_orthogonal(V, cols, "V"))
    return Uf, Vf, (None if U is not None and V is not None else int(seed))


# --------------------------------------------------------------------------------------------- QuIP


def quip(W, H, *, bits, U=None, V=None, seed=0, rescale=True, incoherence=True, rounding="ldlq", npasses=0,
         percdamp=0.01) -> QuipWeight:
    """QuIP-quantize ``W`` (out_features, in_features) with the Hessian ``H`` of its inputs.

    Args:
        W: weight matrix (computed in float64).
        H: (in_features, in_features) Hessian of the layer inputs; its scale does not matter
            (the rescale normalises by ``max|H|``, the projection by the trace, the damping is relative).
        bits: code width; ``2**bits`` levels covering ``[-s, s]``.
        U, V: dense orthogonal (out_features / in_features) matrices replacing the random draws.
        seed: seeds the private generator of the rotations.
        rescale: Algorithm 1's diagonal rescale (``--pre_rescale``).
        incoherence: True / ``"blocked"`` (the blocked butterfly that runs in the original),
            ``"kron"`` (the paper's Kronecker form), ``"blocked_nopermute"``, or False (no
            projection -- and then no trace normalisation and no ``+0.01 I`` either).
        rounding: ``"ldlq"`` (eq. (2), columns last to first) or ``"nearest"``.
        npasses: greedy passes after LDLQ (the code's, residual not refreshed after a pass's clamp).
        percdamp: GPTQ's relative damping ``percdamp * mean(diag H)`` after the projection.

    Returns:
        :class:`QuipWeight`; ``dequantize()`` is in the original basis. ``info``: ``loss`` (eq. (1)
        with the given H), ``loss_projected`` (with the pre-processed H, in the projected basis),
        ``greedy_passes_run``, ``dead_columns``.
    """
    check_matrix(W, "W")
    rows, cols = W.shape
    check_square(H, cols, "H")
    check_quip_args(bits, seed, rescale, incoherence, rounding, npasses, percdamp)
    kind = rotation_kind(incoherence)
    Uf, Vf, seed_used = draw_rotations(rows, cols, int(seed), kind, U, V)
    W0 = np.asarray(W, dtype=np.float64)
    H0 = np.asarray(H, dtype=np.float64)
    Wp, Hp = W0.copy(), H0.copy()
    maxq = 2 ** int(bits) - 1

    t = None
    if rescale:
        Wp, Hp, t = diagonal_rescale(Wp, Hp)
    if kind is not None:
        Hp = Hp * (cols / (np.trace(Hp) + 1e-8)) + 1e-2 * np.eye(cols)
        Wp = butterfly_apply(*Uf, Wp)                        # U W
        Wp = butterfly_apply(*Vf, Wp.T).T                    # (V (U W)^T)^T = U W V^T
        Hp = butterfly_apply(*Vf, butterfly_apply(*Vf, Hp.T).T)   # V (V H^T)^T = V H V^T
    dead = np.diag(Hp) == 0
    idx = np.nonzero(dead)[0]
    Hp[idx, idx] = 1
    Wp[:, dead] = 0
    Hp[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(Hp))

    scale = incoherent_scale(Wp)
    x = grid_coordinates(Wp, scale, maxq)
    passes = 0
    if rounding == "nearest":
        codes = np.clip(np.rint(x), 0, maxq)
    else:
        w = np.clip(x, 0, maxq)
        codes = ldlq(w, Hp, maxq)
        if npasses:
            codes, passes = greedy_passes(w, codes, Hp, maxq, int(npasses))

    def parts(f):
        return {} if f is None else dict(zip(("perm_in", "perm_out", "R1", "R2"), f))

    fields = {f"U_{k}": v for k, v in parts(Uf).items()} | {f"V_{k}": v for k, v in parts(Vf).items()}
    rotation = "none" if kind is None else ("given" if seed_used is None else kind)
    qw = QuipWeight(codes=codes.astype(np.uint8 if bits <= 8 else np.int32), scale=scale, bits=int(bits), t=t,
                    seed=seed_used, rotation=rotation, **fields)
    Wq_proj = qw.projected()
    qw.info.update({"loss": proxy_loss(W0, qw.dequantize(), H0), "loss_projected": proxy_loss(Wp, Wq_proj, Hp),
                    "greedy_passes_run": passes, "dead_columns": int(dead.sum())})
    return qw


__all__ = ["quip", "QuipWeight", "HessianNotPositiveDefinite", "butterfly_factors", "random_rotation",
           "rotation_matrix", "haar_rotations", "diagonal_rescale", "ldlq", "greedy_passes", "incoherent_scale", "proxy_loss",
           "check_quip_args", "draw_rotations", "rotation_kind", "RHO"]
