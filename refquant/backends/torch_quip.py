"""QuipOps of the "torch" backend: :func:`refquant.spec.quip.quip` in float32 torch, fast on CUDA.

Step for step the reference (rescale, projection with the *same* seeded rotations -- drawn on the host
by :func:`refquant.spec.quip.draw_rotations` and applied on the device with
:func:`refquant.spec.formats.butterfly_apply` -- GPTQ's H modification, the incoherent grid, LDLQ last
column first, greedy passes, nearest rounding), with:

* the Cholesky factor of the pre-processed H in float64 (then the unit-diagonal LDL factor in the
  working dtype);
* LDLQ as lazy batch updates (the ``round_ldl_block`` form of the original): blocks of ``blocksize``
  columns from the last, the column loop inside a block on a (columns, rows) buffer, the feedback of a
  finished block to all earlier columns as one matmul. The feedback is accumulated
  (``A_j = w_j + sum_{i>j} (w_i - w_hat_i) L_ij``) rather than recomputed as a dot product per
  column: the same sums in another order;
* ``quip_many`` runs the LDLQ of all matrices of one width as one batch (rows zero-padded; rows are
  independent): on a LLaMA layer q/k/v/o/gate/up (4096 columns) share one column loop, down its own.

Working dtype float32 (as the original); ``dtype=torch.float64`` gives the reference's arithmetic up to
summation order (the CPU tests use it). :class:`TorchQuipOps` is a mixin of
:class:`refquant.backends.torch_backend.TorchBackend`.
"""
from __future__ import annotations

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
from .quip_ops import check_many

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


def ldlq_batched(w: torch.Tensor, L: torch.Tensor, maxq: int, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """LDLQ of a batch: ``w`` (n, rows, d) clamped grid coordinates, ``L`` (n, d, d) strictly lower LDL
    factors -> codes (n, rows, d) as floats. Columns from last to first,
    ``w_hat_i = clamp(floor(w_i + sum_{j>i} (w_j - w_hat_j) L_ji + 1/2), 0, maxq)``."""
    n, rows, d = w.shape
    wT = w.transpose(1, 2).contiguous()          # (n, d, rows): a column is contiguous
    A = wT.clone()                                # accumulated w_i + feedback
    codes = torch.empty_like(wT)
    for i2 in range(d, 0, -blocksize):
        i1 = max(i2 - blocksize, 0)
        b = i2 - i1
        A1 = A[:, i1:i2, :]
        W1 = wT[:, i1:i2, :]
        C1 = codes[:, i1:i2, :]
        L1 = L[:, i1:i2, i1:i2]
        E1 = torch.empty((n, b, rows), dtype=w.dtype, device=w.device)
        for k in range(b - 1, -1, -1):
            c = C1[:, k, :]
            torch.add(A1[:, k, :], 0.5, out=c)
            c.floor_().clamp_(0, maxq)
            e = E1[:, k, :]
            torch.sub(W1[:, k, :], c, out=e)
            if k:
                A1[:, :k, :].addcmul_(L1[:, k, :k].unsqueeze(-1), e.unsqueeze(1))
        if i1:
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


class TorchQuipOps:
    """:class:`~refquant.backends.protocols.QuipOps` in torch (float32 by default; CPU or CUDA)."""

    def quip(self, W, H, *, bits, U=None, V=None, seed=0, rescale=True, incoherence=True, rounding="ldlq",
             npasses=0, percdamp=0.01, dtype=torch.float32, blocksize=BLOCKSIZE) -> QuipWeight:
        return self._quip([W], [H], [seed], [U], [V], bits, rescale, incoherence, rounding, npasses, percdamp,
                          dtype, blocksize)[0]

    def quip_many(self, Ws, Hs, seeds, *, bits, rescale=True, incoherence=True, rounding="ldlq", npasses=0,
                  percdamp=0.01, dtype=torch.float32, blocksize=BLOCKSIZE) -> list[QuipWeight]:
        check_many(Ws, Hs, seeds)
        n = len(Ws)
        return self._quip(list(Ws), list(Hs), list(seeds), [None] * n, [None] * n, bits, rescale, incoherence,
                          rounding, npasses, percdamp, dtype, blocksize)

    # ----------------------------------------------------------------------------------------

    def _quip(self, Ws, Hs, seeds, Us, Vs, bits, rescale, incoherence, rounding, npasses, percdamp, dtype, blocksize):
        for k, (W, H, seed) in enumerate(zip(Ws, Hs, seeds)):
            check_matrix(W, "W")
            check_square(H, int(W.shape[1]), "H")
            check_quip_args(bits, seed, rescale, incoherence, rounding, npasses, percdamp)
        kind = rotation_kind(incoherence)
        maxq = 2 ** int(bits) - 1
        pre = [self._preprocess(W, H, int(s), U, V, kind, rescale, percdamp, maxq, dtype, rounding == "ldlq")
               for W, H, s, U, V in zip(Ws, Hs, seeds, Us, Vs)]
        codes = [None] * len(pre)
        if rounding == "nearest":
            for k, p in enumerate(pre):
                codes[k] = torch.clamp(torch.round(p["x"]), 0, maxq)
        else:
            by_width: dict[int, list[int]] = {}
            for k, p in enumerate(pre):
                by_width.setdefault(int(p["x"].shape[1]), []).append(k)
            for d, ks in by_width.items():
                rows = max(int(pre[k]["x"].shape[0]) for k in ks)
                dev = pre[ks[0]]["x"].device
                w = torch.zeros((len(ks), rows, d), dtype=dtype, device=dev)
                for j, k in enumerate(ks):
                    w[j, :pre[k]["x"].shape[0]] = torch.clamp(pre[k]["x"], 0, maxq)
                L = torch.stack([pre[k]["L"] for k in ks])
                out = ldlq_batched(w, L, maxq, blocksize)
                for j, k in enumerate(ks):
                    codes[k] = out[j, :pre[k]["x"].shape[0]].clone()
                del w, L, out
        results = []
        for k, p in enumerate(pre):
            c, passes = codes[k], 0
            if npasses:
                c, passes = greedy_passes(torch.clamp(p["x"], 0, maxq), c, p["H"], maxq, int(npasses))
            qw = QuipWeight(codes=c.to(torch.uint8 if bits <= 8 else torch.int32), scale=p["scale"], bits=int(bits),
                            t=p["t"], seed=p["seed"], rotation=p["rotation"], **p["rot"])
            H0 = p["H0"]
            D = qw.dequantize().to(torch.float64) - p["W0"]
            qw.info.update({"loss": float(((D @ H0) * D).sum()), "greedy_passes_run": passes,
                            "dead_columns": p["dead"]})
            results.append(qw)
        return results

    @staticmethod
    def _preprocess(W, H, seed, U, V, kind, rescale, percdamp, maxq, dtype, need_L) -> dict:
        W = _tensor(W)
        dev = W.device
        W0 = W.to(torch.float64)
        H0 = _tensor(H, dev, torch.float64)
        rows, cols = W0.shape
        Uf, Vf, seed_used = draw_rotations(rows, cols, seed, kind,
                                           None if U is None else np.asarray(_tensor(U).cpu(), dtype=np.float64),
                                           None if V is None else np.asarray(_tensor(V).cpu(), dtype=np.float64))
        Wp, Hp = W0.to(dtype), H0.to(dtype)
        t = None
        if rescale:
            hmax = torch.max(torch.abs(Hp))
            if hmax > 0:
                Hp = Hp / hmax
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
        Wp = Wp.contiguous()
        Hp = Hp.contiguous()
        dead = torch.diagonal(Hp) == 0
        n_dead = int(dead.sum())
        if n_dead:
            idx = torch.nonzero(dead).flatten()
            Hp[idx, idx] = 1
            Wp[:, dead] = 0
        diag = torch.arange(cols, device=dev)
        Hp[diag, diag] += percdamp * torch.mean(torch.diagonal(Hp))
        scale = float(RHO * torch.sqrt(torch.mean(Wp.to(torch.float64) ** 2)) + 1e-16)
        x = ((Wp / scale + 1) / 2) * maxq
        L = None
        if need_L:
            C, info = torch.linalg.cholesky_ex(Hp.to(torch.float64))
            if int(info) != 0 or not bool(torch.isfinite(C).all()):
                raise HessianNotPositiveDefinite(
                    f"the pre-processed Hessian ({cols}x{cols}) is not positive definite, so LDLQ has no LDL factor. "
                    "Use more calibration data, raise percdamp, or keep incoherence=True (it adds 0.01 I).")
            L = (C * (1 / torch.diagonal(C))[None, :] - torch.eye(cols, dtype=torch.float64, device=dev)).to(dtype)
            del C
        return {"x": x, "H": Hp, "L": L, "t": t, "rot": rot, "scale": scale, "seed": seed_used,
                "rotation": "none" if kind is None else ("given" if seed_used is None else kind),
                "dead": n_dead, "W0": W0, "H0": H0}
