"""Torch twins of PB-LLM and BiLLM (:mod:`refquant.spec.pbllm`, :mod:`refquant.spec.billm`), fast on CUDA.

:class:`TorchBinarizationOps` implements :class:`~refquant.backends.protocols.BinarizationOps`:

* ``pbllm`` / ``pbllm_shared``: the reference's steps in GPTQ's working precision
  (:func:`~.torch_quant.work_dtype`: float64 up to 16384 columns) with GPTQ's prepared ``U``
  (:func:`~.torch_quant._prepare`, computed once for matrices sharing a Hessian). Thresholds and
  binarizer statistics are per matrix (as the reference), all equal-width column groups of a matrix
  at once (one batched ``kthvalue``); the column loop runs once over the rows of all matrices that
  share the Hessian (rows are independent given ``U``): per block one Triton launch on CUDA
  (:mod:`~refquant.backends.pbllm_kernels`), the same arithmetic in per-column torch ops elsewhere.
* ``billm`` / ``billm_shared``: per block, both structural searches evaluate *all* their candidates
  at once -- the 49 salient-column counts as a batch of column-prefix masks of the ranked block, the
  81 break points as a batch of split masks -- as batched masked residual binarizations
  (:func:`residual_batched`), in ``search_dtype`` (float32 on CUDA, the working dtype elsewhere),
  chunked over candidates to bound memory (``search_budget_bytes``). On CUDA with Triton each search
  is instead one kernel launch (:mod:`~refquant.backends.billm_kernels`: per-row sums streamed over
  the block's columns, nothing materialised per candidate). The chosen ``k`` and ``p`` stay on the
  device (no host sync per block). The chosen masks then binarize the block's weights in the working
  dtype, and the error goes to later blocks as in the reference.

Parity: ``refquant/methods/pbllm.py`` / ``billm.py`` state the rules (identical decisions up to
near-ties of float rounding, proxy loss within a tolerance of the reference's).
"""
from __future__ import annotations

import torch

from ..spec import binarize as _bin
from ..spec.billm import BILLM_TERMS, ORDERS, check_billm_args, check_block_width
from ..spec.formats import PartialBinaryWeight, StructuredBinaryWeight
from ..spec.pbllm import check_pbllm_args
from ..spec.quantizer import QuantSpec
from . import billm_kernels as BK
from . import pbllm_kernels
from .numpy_quant import check_shared
from .torch_quant import _prepare, _weight_fp32, find_params, ieee_fp32, work_dtype

__all__ = ["TorchBinarizationOps", "residual_batched", "SEARCH_BUDGET_BYTES"]

#: Bytes of candidate tensors BiLLM's batched searches may hold at once (per chunk of candidates).
SEARCH_BUDGET_BYTES = 2 << 30


def _sign(x):
    return torch.sign(x)


def residual_batched(X, M, order: int):
    """:func:`refquant.spec.binarize.residual_binarize` of ``X`` over a batch of masks.

    ``X``: (..., rows, n); ``M``: bool, broadcastable against it with a leading candidate dim
    (K, rows or 1, n). Returns ``(total, signs, alphas, means)`` like the reference (signs in X's
    dtype, -1/0/+1, zero outside the mask; alphas, means of shape (K, rows)).
    """
    Mf = M.to(X.dtype)
    cnt = Mf.sum(dim=-1).clamp_min(1)
    Xm = X * Mf
    total = torch.zeros_like(Xm)
    signs, alphas, means = [], [], []
    for _ in range(order):
        r = Xm - total
        mean = r.sum(dim=-1) / cnt
        c = r - mean.unsqueeze(-1)
        alpha = (c.abs() * Mf).sum(dim=-1) / cnt
        s = _sign(c) * Mf
        total = total + (s * alpha.unsqueeze(-1) + mean.unsqueeze(-1)) * Mf
        signs.append(s)
        alphas.append(alpha)
        means.append(mean)
    return total, signs, alphas, means


def _chunk(n_candidates: int, rows: int, cols: int, elem: int, budget: int, live: int = 8) -> int:
    per = max(1, rows * cols * elem * live)
    return max(1, min(n_candidates, budget // per))


def _column_errors(S, ranking, ks, budget):
    """The salient-column objective for every k at once (chunks of candidates)."""
    rows, n = S.shape
    pos = torch.empty_like(ranking)
    pos[ranking] = torch.arange(n, device=S.device)  # rank of each column
    kt = torch.tensor(ks, device=S.device)
    out = []
    step = _chunk(len(ks), rows, n, S.element_size(), budget)
    for c0 in range(0, len(ks), step):
        M = (pos[None, :] < kt[c0:c0 + step, None])[:, None, :]  # (K, 1, n)
        approx = residual_batched(S, M, 2)[0] + residual_batched(S, ~M, 2)[0]
        out.append(((S - approx) ** 2).mean(dim=(-2, -1)))
    return torch.cat(out)


def _split_errors(S, M, ps, g3, budget):
    rows, n = S.shape
    A = torch.where(M, torch.zeros_like(S), S).abs()
    out = []
    step = _chunk(int(ps.shape[0]), rows, n, S.element_size(), budget)
    for c0 in range(0, int(ps.shape[0]), step):
        p = ps[c0:c0 + step, None, None]
        m1 = (A < p) & ~M
        m2 = (A >= p) & ~M
        approx = residual_batched(S, m1, 1)[0] + residual_batched(S, m2, 1)[0] + g3
        out.append(((S - approx) ** 2).mean(dim=(-2, -1)))
    return torch.cat(out)


def _billm_matrix(W, prep, blocksize: int, salient_metric: str, search_on: str, search_dtype, budget: int,
                  use_triton=None):
    """One matrix, no host sync per block: the chosen ``k`` and ``p`` stay on the device (``k`` = argmin + 1,
    ``p`` gathered), the searches run as Triton launches where usable (:mod:`~refquant.backends.billm_kernels`)."""
    rows, cols = W.shape
    dev = W.device
    if prep.any_dead:
        W[:, prep.dead] = 0
    U = prep.U
    Ud = U.diagonal()
    n_blocks = -(-cols // blocksize)
    salient = torch.zeros(cols, dtype=torch.bool, device=dev)
    split = torch.zeros((rows, cols), dtype=torch.bool, device=dev)
    signs1 = torch.zeros((rows, cols), dtype=torch.int8, device=dev)
    signs2 = torch.zeros((rows, cols), dtype=torch.int8, device=dev)
    alpha = torch.zeros((rows, n_blocks, BILLM_TERMS), dtype=W.dtype, device=dev)
    mean = torch.zeros((rows, n_blocks, BILLM_TERMS), dtype=W.dtype, device=dev)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    levels = torch.tensor(_bin.split_levels(), device=dev, dtype=search_dtype)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        n = i2 - i1
        Wb = W[:, i1:i2]
        T = Wb if salient_metric == "magnitude" else Wb ** 2 / Ud[i1:i2][None, :] ** 2
        Ts = T.to(search_dtype)
        S = Ts if search_on == "saliency" else Wb.to(search_dtype)
        ranking = torch.argsort(-Ts.abs().sum(dim=0), stable=True)
        pos = torch.empty_like(ranking)
        pos[ranking] = torch.arange(n, device=dev)  # rank of each column
        ks = _bin.salient_candidates(n)  # 1..K: candidate i is k = i + 1
        ST = S.t().contiguous() if (BK.search_kernels_usable(dev, n) if use_triton is None else use_triton) else None
        col_err = BK.run_search("column search", use_triton, dev, n,
                                lambda: BK.column_row_errors_triton(ST, pos, len(ks)).sum(dim=1),
                                lambda: _column_errors(S, ranking, ks, budget))
        cols_mask = pos < torch.argmin(col_err) + 1  # the top-k columns, k on the device
        M = cols_mask[None, :].expand(rows, n)
        A = torch.where(M, torch.zeros_like(S), S).abs()
        ps = torch.quantile(A.flatten(), levels)
        g3s = residual_batched(S, M, 2)[0]
        split_err = BK.run_search("split search", use_triton, dev, n,
                                  lambda: BK.split_row_errors_triton(ST, g3s.t().contiguous(), cols_mask,
                                                                     ps).sum(dim=1),
                                  lambda: _split_errors(S, M, ps, g3s, budget))
        p = ps.gather(0, torch.argmin(split_err).reshape(1))
        m1 = (A < p) & ~M
        m2 = (A >= p) & ~M
        q1, s1a, a1, mu1 = residual_batched(Wb, m1, ORDERS[0])
        q2, s2a, a2, mu2 = residual_batched(Wb, m2, ORDERS[1])
        q3, s3, a3, mu3 = residual_batched(Wb, M, ORDERS[2])
        Q = q1 * m1 + q2 * m2 + q3 * M
        salient[i1:i2] = cols_mask
        split[:, i1:i2] = m2
        signs1[:, i1:i2] = (s1a[0] + s2a[0] + s3[0]).to(torch.int8)
        signs2[:, i1:i2] = s3[1].to(torch.int8)
        alpha[:, b] = torch.stack([a1[0], a2[0], a3[0], a3[1]], dim=1)
        mean[:, b] = torch.stack([mu1[0], mu2[0], mu3[0], mu3[1]], dim=1)
        d = Ud[i1:i2][None, :]
        E = (Wb - Q) / d
        loss += (E.double() ** 2).sum() / 2
        if i2 < cols:
            W[:, i2:].addmm_(E, U[i1:i2, i2:], alpha=-1)
    return StructuredBinaryWeight(salient_columns=salient, split=split, signs1=signs1, signs2=signs2, alpha=alpha,
                                  mean=mean, block_size=int(blocksize),
                                  info={"loss": float(loss), "percdamp": prep.percdamp,
                                        "mean_salient_columns_per_block": float(salient.sum()) / n_blocks})


#: Elements of score per chunk of equal-width column groups in :func:`_pbllm_masks` (bounds the
#: working memory: a few float64 tensors of this size live at once).
MASK_CHUNK_ELEMS = 1 << 26

#: On CUDA, chunks of fewer groups than this take their thresholds from a sort (multi-block, cub) rather
#: than ``kthvalue`` (one thread block per group): e.g. one group per matrix, 58.7M scores for down_proj.
SORT_BELOW_GROUPS = 8


def _kth_smallest(flat, k: int, use_sort=None):
    """``sorted(row)[k - 1]`` of every row of ``flat`` (G, n), exactly (a selection; ties do not matter)."""
    if use_sort is None:
        use_sort = flat.is_cuda and flat.shape[0] < SORT_BELOW_GROUPS
    if use_sort:
        return torch.sort(flat, dim=1).values[:, k - 1]
    return torch.kthvalue(flat, k, dim=1).values


def _group_masks(Wt, Udt, low_frac, salient_metric, stats):
    """Binarized mask (G, rows, n) and binarizer (mean, alpha) (G, rows) of G equal-width groups at once.

    ``Wt``: (G, rows, n) the groups' weights; ``Udt``: (G, 1, n) their ``U_jj``. Per group the same
    elementwise score and the same threshold *value* as one group at a time (``kthvalue`` is a
    selection: ``sorted(score)[int(n low_frac)]`` exactly); the statistics reduce over each row's
    ``n`` contiguous entries, as before.
    """
    score = Wt.abs() if salient_metric == "magnitude" else Wt ** 2 / Udt ** 2
    flat = score.flatten(1)
    thresh = _kth_smallest(flat, int(flat.shape[1] * low_frac) + 1)  # sorted(score)[int(n low_frac)]
    m = score <= thresh[:, None, None]
    if stats == "code":
        x = torch.where(m, Wt, torch.zeros_like(Wt))
        mu = x.mean(dim=2)
        al = (x - mu[..., None]).abs().mean(dim=2)
    else:
        _, _, a, mm = residual_batched(Wt, m, 1)
        mu, al = mm[0], a[0]
    return m, mu, al


def _pbllm_masks(W, Ud, low_frac, salient_metric, gs, stats):
    """Binarized mask and (mean, alpha) per (row, group) of one matrix (dead columns already zero).

    The full-width groups go through :func:`_group_masks` in chunks of groups (one ``kthvalue``
    launch per chunk: on CUDA one radix select per group, all groups of the chunk in parallel,
    instead of one single-block select per group after another); a ragged last group alone.
    """
    rows, cols = W.shape
    binarized = torch.empty((rows, cols), dtype=torch.bool, device=W.device)
    means, alphas = [], []
    n_full = cols // gs
    step = max(1, MASK_CHUNK_ELEMS // max(1, rows * gs))
    bounds = [(k0 * gs, min(k0 + step, n_full) * gs) for k0 in range(0, n_full, step)]
    if n_full * gs < cols:
        bounds.append((n_full * gs, cols))
    for c0, c1 in bounds:
        w = min(gs, c1 - c0)
        Wt = W[:, c0:c1].unflatten(1, (-1, w)).transpose(0, 1).contiguous()  # (G, rows, w)
        Udt = Ud[c0:c1].reshape(-1, 1, w)
        m, mu, al = _group_masks(Wt, Udt, low_frac, salient_metric, stats)
        binarized[:, c0:c1] = m.transpose(0, 1).reshape(rows, c1 - c0)
        means.append(mu.T)
        alphas.append(al.T)
    return binarized, torch.cat(means, dim=1).contiguous(), torch.cat(alphas, dim=1).contiguous()


def _pbllm_loop(W, U, binarized, mean, alpha, s, z, maxq, gs, blocksize, use_triton=None):
    """The column loop over the (concatenated) rows: codes (uint8), signs (int8), per-row loss.

    One :func:`~refquant.backends.pbllm_kernels.block_update` per block (a Triton launch on CUDA, the
    per-column torch ops elsewhere), then the loss and the lazy update of the later columns; no host
    synchronization inside the loop.
    """
    rows, cols = W.shape
    dev = W.device
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=dev)
    signs = torch.empty((rows, cols), dtype=torch.int8, device=dev)
    row_loss = torch.zeros(rows, dtype=torch.float64, device=dev)
    gidx = torch.arange(cols, device=dev) // gs
    s, z = s.contiguous(), z.contiguous()
    mean, alpha = mean.contiguous(), alpha.contiguous()
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        E = torch.empty((rows, i2 - i1), dtype=W.dtype, device=dev)
        pbllm_kernels.block_update(W[:, i1:i2], U[i1:i2, i1:i2], s, z, mean, alpha, gidx[i1:i2], binarized[:, i1:i2],
                                   maxq, codes[:, i1:i2], signs[:, i1:i2], E, use_triton=use_triton)
        row_loss += (E.double() ** 2).sum(dim=1) / 2
        if i2 < cols:
            W[:, i2:].addmm_(E, U[i1:i2, i2:], alpha=-1)
    return codes, signs, row_loss


class TorchBinarizationOps:
    """:class:`~refquant.backends.protocols.BinarizationOps` in torch (see the module docstring)."""

    def pbllm(self, W, H, *, low_frac=0.9, high_bits=8, salient_metric="hessian", blocksize=128, percdamp=0.01,
              group_size=None, binarizer_stats="code", use_triton=None):
        return self.pbllm_shared([W], H, low_frac=low_frac, high_bits=high_bits, salient_metric=salient_metric,
                                 blocksize=blocksize, percdamp=percdamp, group_size=group_size,
                                 binarizer_stats=binarizer_stats, use_triton=use_triton)[0]

    def pbllm_shared(self, Ws, H, *, low_frac=0.9, high_bits=8, salient_metric="hessian", blocksize=128,
                     percdamp=0.01, group_size=None, binarizer_stats="code", use_triton=None):
        """:func:`refquant.pbllm` of several matrices sharing ``H`` (one factorization, one column loop).

        ``use_triton``: the block kernel of :mod:`~refquant.backends.pbllm_kernels` (None: on CUDA
        when Triton is usable; True: always (interpreter on the CPU); False: the torch ops).
        """
        check_pbllm_args(low_frac, high_bits, salient_metric, blocksize, percdamp, group_size, binarizer_stats)
        cols = check_shared(Ws)
        with torch.no_grad(), ieee_fp32():
            device = torch.as_tensor(Ws[0]).device if isinstance(Ws[0], torch.Tensor) else torch.device("cpu")
            mats = [_weight_fp32(W, f"Ws[{k}]", device=device, dtype=work_dtype(cols)) for k, W in enumerate(Ws)]
            shape_text = ", ".join(f"{m.shape[0]}x{cols}" for m in mats)
            prep = _prepare(H, cols, device, percdamp, False, None, 0.01, shape_text)
            spec = QuantSpec(bits=int(high_bits))
            gs = cols if group_size is None else int(group_size)
            parts = []
            for m in mats:
                s, z = find_params(m, spec)  # original rows, before dead zeroing
                if prep.any_dead:
                    m[:, prep.dead] = 0
                parts.append((s, z, *_pbllm_masks(m, prep.U.diagonal(), low_frac, salient_metric, gs, binarizer_stats)))
            sizes = [m.shape[0] for m in mats]
            cat = lambda i: torch.cat([p[i] for p in parts], dim=0)  # noqa: E731
            s, z, binarized, mean, alpha = cat(0), cat(1), cat(2), cat(3), cat(4)
            codes, signs, row_loss = _pbllm_loop(torch.cat(mats, dim=0), prep.U, binarized, mean, alpha, s, z,
                                                 spec.maxq, gs, int(blocksize), use_triton=use_triton)
            out = []
            for sl in _slices(sizes):
                out.append(PartialBinaryWeight(
                    salient_mask=~binarized[sl], codes=codes[sl], scale=s[sl], zero=z[sl], signs=signs[sl],
                    alpha=alpha[sl], mean=mean[sl], high_bits=int(high_bits), group_size=group_size,
                    info={"loss": float(row_loss[sl].sum()), "percdamp": prep.percdamp}))
            return out

    def billm(self, W, H, *, blocksize=128, percdamp=0.01, salient_metric="hessian", search_on="saliency",
              narrow_blocks="extend", search_dtype=None, search_budget_bytes=SEARCH_BUDGET_BYTES, use_triton=None):
        return self.billm_shared([W], H, blocksize=blocksize, percdamp=percdamp, salient_metric=salient_metric,
                                 search_on=search_on, narrow_blocks=narrow_blocks, search_dtype=search_dtype,
                                 search_budget_bytes=search_budget_bytes, use_triton=use_triton)[0]

    def billm_shared(self, Ws, H, *, blocksize=128, percdamp=0.01, salient_metric="hessian", search_on="saliency",
                     narrow_blocks="extend", search_dtype=None, search_budget_bytes=SEARCH_BUDGET_BYTES,
                     use_triton=None):
        """:func:`refquant.billm` of several matrices sharing ``H`` (one factorization; searches per matrix).

        ``search_dtype``: dtype of the searches (None: float32 on CUDA, the working dtype elsewhere).
        ``use_triton``: the searches as Triton kernels (None: where usable, i.e. on CUDA with Triton;
        False: the vectorised torch searches; True: the kernels or an error).
        """
        check_billm_args(blocksize, percdamp, salient_metric, search_on, narrow_blocks)
        cols = check_shared(Ws)
        for i1 in range(0, cols, blocksize):
            check_block_width(min(i1 + blocksize, cols) - i1, narrow_blocks, f"block at column {i1}")
        with torch.no_grad(), ieee_fp32():
            device = Ws[0].device if isinstance(Ws[0], torch.Tensor) else torch.device("cpu")
            wd = work_dtype(cols)
            sd = search_dtype or (torch.float32 if device.type == "cuda" else wd)
            mats = [_weight_fp32(W, f"Ws[{k}]", device=device, dtype=wd) for k, W in enumerate(Ws)]
            shape_text = ", ".join(f"{m.shape[0]}x{cols}" for m in mats)
            prep = _prepare(H, cols, device, percdamp, False, None, 0.01, shape_text)
            return [_billm_matrix(m, prep, int(blocksize), salient_metric, search_on, sd, int(search_budget_bytes),
                                  use_triton)
                    for m in mats]


def _slices(sizes):
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out
