"""QuipOps of the "torch" backend: :func:`refquant.spec.quip.quip` in float32 torch, fast on CUDA.

Step for step the reference (rescale, projection with the *same* seeded rotations -- drawn on the host
by :func:`refquant.spec.quip.draw_rotations` and applied on the device with
:func:`refquant.spec.formats.butterfly_apply` -- GPTQ's H modification, the incoherent grid, LDLQ last
column first, greedy passes, nearest rounding), with:

* the Cholesky factor of the pre-processed H in float64 (then the unit-diagonal LDL factor in the
  working dtype);
* LDLQ as lazy batch updates (the ``round_ldl_block`` form of the original): blocks of ``blocksize``
  columns from the last, the column loop inside a block on a (columns, rows) buffer -- one Triton launch
  per block on CUDA (:mod:`refquant.backends.quip_kernels`), bit for bit the torch ops that run on the
  CPU -- the feedback of a finished block to all earlier columns as one matmul. The feedback is
  accumulated (``A_j = w_j + sum_{i>j} (w_i - w_hat_i) L_ij``) rather than recomputed as a dot product
  per column: the same sums in another order;
* ``quip_many`` runs the LDLQ of all matrices of one width as one batch (rows zero-padded; rows are
  independent; the kernel skips the padding): on a LLaMA layer q/k/v/o/gate/up (4096 columns) share one
  column loop, down its own. Matrices given the same H object share its float64 copy; the rotations of
  all matrices are drawn on the host in parallel threads (each from its own seeded generator: the same
  factors; :meth:`TorchQuipOps.quip_prefetch` starts them ahead, for the next layer) while the device
  pre-processes the matrices already drawn; past the input checks the pre-processing syncs with the host
  twice per matrix (the grid scale, the Cholesky check) and the losses come back in one copy.

Working dtype float32 (as the original); ``dtype=torch.float64`` gives the reference's arithmetic up to
summation order (the CPU tests use it). :class:`TorchQuipOps` is a mixin of
:class:`refquant.backends.torch_backend.TorchBackend`.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the machine
    from . import BackendUnavailable

    raise BackendUnavailable(
        "the 'torch' backend needs PyTorch: pip install torch (CPU wheel: pip install 'refquant[torch]')."
    ) from e

from ..spec._checks import check_matrix, check_square
from ..spec.formats import QuipWeight, butterfly_apply
from ..spec.quip import RHO, HessianNotPositiveDefinite, check_quip_args, draw_rotations, rotation_kind
from . import quip_kernels as QK
from .quip_ops import check_many
from .torch_quant import ieee_fp32

__all__ = ["TorchQuipOps", "ldlq_batched"]

#: Columns per lazy-update block of LDLQ.
BLOCKSIZE = 128


def _tensor(x, device=None, dtype=None):
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif type(x).__module__.startswith("cupy"):
        t = torch.from_dlpack(x)
    else:
        raise ValueError(f"expected a torch tensor (or NumPy/CuPy array); got {type(x).__name__}.")
    return t.to(device=device if device is not None else t.device, dtype=dtype if dtype is not None else t.dtype)


def ldlq_batched(w: torch.Tensor, L: torch.Tensor, maxq: int, blocksize: int = BLOCKSIZE, rows=None,
                 use_triton: bool | None = None) -> torch.Tensor:
    """LDLQ of a batch: ``w`` (n, rows, d) clamped grid coordinates, ``L`` (n, d, d) strictly lower LDL
    factors -> codes (n, rows, d) as floats. Columns from last to first,
    ``w_hat_i = clamp(floor(w_i + sum_{j>i} (w_j - w_hat_j) L_ji + 1/2), 0, maxq)``.

    Blocks of ``blocksize`` columns from the last: the column loop of a block is
    :func:`refquant.backends.quip_kernels.ldlq_block` (one Triton launch on CUDA, torch ops on the CPU; the
    same arithmetic bit for bit), the feedback of a finished block to all earlier columns one matmul.
    ``rows``: the valid rows of each matrix (the rest zero padding; default all): the kernel skips the padding,
    and with padding the feedback is one matmul per matrix over its valid rows (either path, so that both give
    the same codes on one device); the result's padded rows carry no meaning (0 for zero padding).
    ``use_triton``: None auto, False the torch path, True the kernel (errors raised).
    """
    n, R, d = w.shape
    rows = [R] * n if rows is None else [int(r) for r in rows]
    if len(rows) != n or any(not 0 <= r <= R for r in rows):
        raise ValueError(f"rows must give 0..{R} valid rows for each of the {n} matrices; got {rows}.")
    plan = QK.launch_plan(rows, blocksize, w.device) if QK.use_kernel(w.device, blocksize, use_triton) else None
    padded = any(r < R for r in rows)
    wT = w.transpose(1, 2).contiguous()          # (n, d, rows): a column is contiguous
    A = wT.clone()                                # accumulated w_i + feedback
    codes = torch.zeros_like(wT)
    E = torch.zeros((n, min(blocksize, d), R), dtype=w.dtype, device=w.device)
    for i2 in range(d, 0, -blocksize):
        i1 = max(i2 - blocksize, 0)
        E1 = E[:, :i2 - i1, :]                    # a ragged block is the first one (i1 = 0: no feedback)
        QK.ldlq_block(A[:, i1:i2, :], wT[:, i1:i2, :], L[:, i1:i2, i1:i2], maxq, codes[:, i1:i2, :], E1, plan,
                      use_triton)
        if i1:
            if padded:
                for j, r in enumerate(rows):
                    if r:
                        A[j, :i1, :r].addmm_(L[j, i1:i2, :i1].T, E1[j, :, :r])
            else:
                A[:, :i1, :].baddbmm_(L[:, i1:i2, :i1].transpose(1, 2), E1)
    return codes.transpose(1, 2)


def greedy_passes(w, codes, H, maxq: int, npasses: int):
    """The reference's greedy passes (:func:`refquant.spec.quip.greedy_passes`) in torch."""
    w_hat = codes.clone()
    wr = codes.clone()
    s = codes - w
    H = H / torch.max(torch.diagonal(H))
    run = 0
    for _ in range(npasses):
        run += 1
        for i in range(w.shape[1] - 1, -1, -1):
            Hs = s @ H[:, i]
            eps = wr[:, i] - torch.round(wr[:, i] - Hs / H[i, i])
            wr[:, i] -= eps
            s[:, i] -= eps
        wr = torch.clamp(wr, 0, maxq)
        if torch.equal(w_hat, wr):
            break
        w_hat = wr.clone()
    return wr, run


#: Background threads drawing rotations on the host (created on first use; idle threads cost nothing).
_DRAW_POOL: ThreadPoolExecutor | None = None
_DRAW_LOCK = threading.Lock()
#: Draws started ahead of time by :meth:`TorchQuipOps.quip_prefetch`, by (rows, cols, seed, kind), oldest first.
_PREFETCHED: OrderedDict = OrderedDict()
#: Most prefetched draws kept (one LLaMA layer has 7; the oldest unclaimed ones are dropped).
PREFETCH_LIMIT = 32


def _draw_pool() -> ThreadPoolExecutor:
    global _DRAW_POOL
    with _DRAW_LOCK:
        if _DRAW_POOL is None:
            _DRAW_POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                            thread_name_prefix="refquant-quip-draw")
        return _DRAW_POOL


def _draw_all(shapes, seeds, kind, Us, Vs) -> list:
    """Every matrix's rotation factors (:func:`refquant.spec.quip.draw_rotations`, host NumPy: Gaussian draws
    and batched QRs), as futures: a prefetched draw when there is one, else one submitted now. Each draw has
    its own generator seeded with its seed, so drawing in parallel threads (NumPy releases the GIL in the QRs
    and the normal fills) or ahead of time gives the serial draws' factors bit for bit, while the caller keeps
    the device busy with the matrices already drawn."""
    futures = []
    for (rows, cols), seed, U, V in zip(shapes, seeds, Us, Vs):
        if kind is None or U is not None or V is not None:  # nothing to draw, or dense rotations to check: now
            f = Future()
            try:
                f.set_result(draw_rotations(rows, cols, seed, kind,
                                            None if U is None else np.asarray(_tensor(U).cpu(), dtype=np.float64),
                                            None if V is None else np.asarray(_tensor(V).cpu(), dtype=np.float64)))
            except Exception as e:  # re-raised by .result(), where the caller needs the factors
                f.set_exception(e)
        else:
            with _DRAW_LOCK:
                f = _PREFETCHED.pop((rows, cols, seed, kind), None)
            if f is None:
                f = _draw_pool().submit(draw_rotations, rows, cols, seed, kind)
        futures.append(f)
    return futures


class TorchQuipOps:
    """:class:`~refquant.backends.protocols.QuipOps` in torch (float32 by default; CPU or CUDA).

    ``use_triton``: LDLQ's block loop as the Triton kernel (None: auto, on CUDA), False the torch ops, True the
    kernel with errors raised (:mod:`refquant.backends.quip_kernels`; bit for bit the same codes)."""

    def quip(self, W, H, *, bits, U=None, V=None, seed=0, rescale=True, incoherence=True, rounding="ldlq",
             npasses=0, percdamp=0.01, dtype=torch.float32, blocksize=BLOCKSIZE, use_triton=None) -> QuipWeight:
        return self._quip([W], [H], [seed], [U], [V], bits, rescale, incoherence, rounding, npasses, percdamp,
                          dtype, blocksize, use_triton)[0]

    def quip_many(self, Ws, Hs, seeds, *, bits, rescale=True, incoherence=True, rounding="ldlq", npasses=0,
                  percdamp=0.01, dtype=torch.float32, blocksize=BLOCKSIZE, use_triton=None) -> list[QuipWeight]:
        check_many(Ws, Hs, seeds)
        n = len(Ws)
        return self._quip(list(Ws), list(Hs), list(seeds), [None] * n, [None] * n, bits, rescale, incoherence,
                          rounding, npasses, percdamp, dtype, blocksize, use_triton)

    def quip_prefetch(self, shapes, seeds, *, incoherence=True) -> None:
        """Start drawing the rotations of matrices of ``shapes`` ((rows, cols) each) with ``seeds`` in background
        threads (host NumPy); a later :meth:`quip` / :meth:`quip_many` with the same shape, seed and incoherence
        takes the finished draw instead of drawing again (the same factors: the draw is a function of its
        arguments). The layer loop calls it for the next layer, so the draws overlap this layer's device work and
        the next calibration pass. At most :data:`PREFETCH_LIMIT` unclaimed draws are kept."""
        kind = rotation_kind(incoherence)
        if len(shapes) != len(seeds):
            raise ValueError(f"quip_prefetch needs one seed per shape; got {len(shapes)} shapes, {len(seeds)} seeds.")
        if kind is None:
            return
        for shape, seed in zip(shapes, seeds):
            rows, cols = (int(v) for v in shape)
            if rows < 1 or cols < 1 or isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
                raise ValueError(f"quip_prefetch: shape {tuple(shape)} / seed {seed!r} invalid (dimensions >= 1, "
                                 "seed an integer >= 0).")
            key = (rows, cols, int(seed), kind)
            with _DRAW_LOCK:
                if key in _PREFETCHED:
                    continue
            f = _draw_pool().submit(draw_rotations, rows, cols, int(seed), kind)
            with _DRAW_LOCK:
                _PREFETCHED[key] = f
                while len(_PREFETCHED) > PREFETCH_LIMIT:
                    _PREFETCHED.popitem(last=False)

    # ----------------------------------------------------------------------------------------

    def _quip(self, *args):
        with torch.no_grad(), ieee_fp32():  # fp32 matmuls in full precision even where a caller enabled TF32
            return self._quip_impl(*args)

    def _quip_impl(self, Ws, Hs, seeds, Us, Vs, bits, rescale, incoherence, rounding, npasses, percdamp, dtype,
                   blocksize, use_triton=None):
        for k, (W, H, seed) in enumerate(zip(Ws, Hs, seeds)):
            check_matrix(W, "W")
            check_square(H, int(W.shape[1]), "H")
            check_quip_args(bits, seed, rescale, incoherence, rounding, npasses, percdamp)
        kind = rotation_kind(incoherence)
        maxq = 2 ** int(bits) - 1
        Ws = [_tensor(W) for W in Ws]
        draws = _draw_all([tuple(int(s) for s in W.shape) for W in Ws], [int(s) for s in seeds], kind, Us, Vs)
        H0s: dict[int, torch.Tensor] = {}  # matrices given the same H object (q/k/v, gate/up) share its float64 copy
        pre = []
        for W, H, f in zip(Ws, Hs, draws):
            if id(H) not in H0s:
                H0s[id(H)] = _tensor(H, W.device, torch.float64)
            pre.append(self._preprocess(W, H0s[id(H)], f.result(), kind, rescale, percdamp, maxq, dtype,
                                        rounding == "ldlq"))
        codes = [None] * len(pre)
        if rounding == "nearest":
            for k, p in enumerate(pre):
                codes[k] = torch.clamp(torch.round(p["x"]), 0, maxq)
        else:
            by_width: dict[int, list[int]] = {}
            for k, p in enumerate(pre):
                by_width.setdefault(int(p["x"].shape[1]), []).append(k)
            for d, ks in by_width.items():
                nrows = [int(pre[k]["x"].shape[0]) for k in ks]
                dev = pre[ks[0]]["x"].device
                w = torch.zeros((len(ks), max(nrows), d), dtype=dtype, device=dev)
                for j, k in enumerate(ks):
                    w[j, :nrows[j]] = torch.clamp(pre[k]["x"], 0, maxq)
                L = torch.stack([pre[k].pop("L") for k in ks])
                out = ldlq_batched(w, L, maxq, blocksize, rows=nrows, use_triton=use_triton)
                for j, k in enumerate(ks):
                    codes[k] = out[j, :nrows[j]].clone()
                del w, L, out
        results, losses = [], []
        for k, p in enumerate(pre):
            c, passes = codes[k], 0
            if npasses:
                c, passes = greedy_passes(torch.clamp(p["x"], 0, maxq), c, p["H"], maxq, int(npasses))
            qw = QuipWeight(codes=c.to(torch.uint8 if bits <= 8 else torch.int32), scale=p["scale"], bits=int(bits),
                            t=p["t"], seed=p["seed"], rotation=p["rotation"], **p["rot"])
            D = qw.dequantize().to(torch.float64) - p["W0"]
            losses.append(((D @ p["H0"]) * D).sum())
            del D
            qw.info["greedy_passes_run"] = passes
            results.append(qw)
        # one device -> host copy for every matrix's loss and dead-column count (no sync per matrix)
        host = torch.stack(losses + [p["dead"].to(torch.float64) for p in pre]).cpu().tolist()
        for k, qw in enumerate(results):
            qw.info.update({"loss": host[k], "dead_columns": int(host[len(pre) + k])})
        return results

    @staticmethod
    def _preprocess(W, H0, factors, kind, rescale, percdamp, maxq, dtype, need_L) -> dict:
        """Algorithm 1 on one matrix (``W`` on its device, ``H0`` its float64 Hessian there, ``factors`` the
        rotations drawn on the host). One host sync (the grid scale, a Python float) and one more for the
        Cholesky check when LDLQ needs the factor."""
        dev = W.device
        W0 = W.to(torch.float64)
        rows, cols = W0.shape
        Uf, Vf, seed_used = factors
        Wp, Hp = W0.to(dtype), H0.to(dtype)
        t = None
        if rescale:
            hmax = torch.max(torch.abs(Hp))
            Hp = Hp / torch.where(hmax > 0, hmax, torch.ones_like(hmax))  # an all-zero H stays as it is (x / 1 == x)
            dH = torch.clamp(torch.diagonal(Hp), min=1e-8)
            dW = torch.clamp((Wp * Wp).sum(0), min=1e-8)
            t = torch.clamp(torch.sqrt(torch.sqrt(dH / dW)), min=1e-8)
            Wp = Wp * t[None, :]
            Hp = Hp / t[None, :]
            Hp = Hp / t[:, None]
        rot = {}
        if kind is not None:
            Hp = Hp * (cols / (torch.trace(Hp) + 1e-8)) + 1e-2 * torch.eye(cols, dtype=dtype, device=dev)
            Uf = tuple(_tensor(a, dev, torch.int64 if a.dtype.kind == "i" else dtype) for a in Uf)
            Vf = tuple(_tensor(a, dev, torch.int64 if a.dtype.kind == "i" else dtype) for a in Vf)
            Wp = butterfly_apply(*Uf, Wp)
            Wp = butterfly_apply(*Vf, Wp.T).T
            Hp = butterfly_apply(*Vf, butterfly_apply(*Vf, Hp.T).T)
            for side, f in (("U", Uf), ("V", Vf)):
                rot.update({f"{side}_{k}": v for k, v in zip(("perm_in", "perm_out", "R1", "R2"), f)})
        if not rescale and kind is None:  # Wp / Hp may still be the caller's tensors: edited in place below
            Wp, Hp = Wp.clone(), Hp.clone()
        Wp = Wp.contiguous()
        Hp = Hp.contiguous()
        dead = torch.diagonal(Hp) == 0
        torch.diagonal(Hp).masked_fill_(dead, 1)   # GPTQ's H modification, without a host sync
        Wp.masked_fill_(dead[None, :], 0)
        torch.diagonal(Hp).add_(percdamp * torch.mean(torch.diagonal(Hp)))
        scale = float(RHO * torch.sqrt(torch.mean(Wp.to(torch.float64) ** 2)) + 1e-16)
        x = ((Wp / scale + 1) / 2) * maxq
        L = None
        if need_L:
            C, info = torch.linalg.cholesky_ex(Hp.to(torch.float64))
            if bool((info != 0) | ~torch.isfinite(C).all()):
                raise HessianNotPositiveDefinite(
                    f"the pre-processed Hessian ({cols}x{cols}) is not positive definite, so LDLQ has no LDL factor. "
                    "Use more calibration data, raise percdamp, or keep incoherence=True (it adds 0.01 I).")
            C.mul_((1 / torch.diagonal(C))[None, :])
            torch.diagonal(C).sub_(1)             # C / diag(C) - I, in place (no n x n identity)
            L = C.to(dtype)
            del C
        return {"x": x, "H": Hp, "L": L, "t": t, "rot": rot, "scale": scale, "seed": seed_used,
                "rotation": "none" if kind is None else ("given" if seed_used is None else kind),
                "dead": dead.sum(), "W0": W0, "H0": H0}
