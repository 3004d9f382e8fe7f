"""DB-LLM in torch: the FDB twin (golden parity) and the training pieces of Deviation-Aware Distillation.

* :class:`TorchDBLLMOps` -- :class:`~refquant.backends.protocols.DBLLMOps` on a device. The
  initialisation (:func:`fdb_params`, :func:`fdb_split`) runs in float64 with the reference's
  elementwise arithmetic (the 2-bit step and zero point from :func:`.torch_quant.group_params`, the
  shared torch quantizer), so for ``steps=0`` it is bit-identical to :func:`refquant.dbllm`; the
  layer-wise scale steps (``steps > 0``) do their matrix products in float64 on the device (same
  result to float64 rounding).
* :class:`FDBLinear` -- a linear layer whose weight is FDB's ``a1 b1 + a2 b2 + c`` of a latent
  weight, with learnable scales (and, optionally, the latent weight) trained through the
  straight-through estimator (paper, Sec. 3.2: "STE ... to approximate the gradient");
  :func:`attach_fdb` / :func:`merge_fdb` put such layers into / take them out of a model.
* :func:`dad_loss` -- Deviation-Aware Distillation (paper, Sec. 3.3): per-token KL(teacher ||
  student) re-weighted by the entropy-based ambiguity of the teacher's (or both models')
  prediction. The weighting formula is UNVERIFIED against the paper's text (see
  ``docs/methods/dbllm.md``); every free choice is a parameter.

The full-model training loop (data, optimizer, checkpoints, the loss curve) is the application's
``refquant/distill.py``.
"""
from __future__ import annotations

import math

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:  # pragma: no cover - depends on the machine
    from . import BackendUnavailable

    raise BackendUnavailable("DB-LLM's torch twin needs PyTorch: pip install torch.") from e

from ..spec._checks import check_finite, check_matrix, check_square
from ..spec.dbllm import BITS, OFFSETS
from ..spec.formats import DualBinaryWeight
from ..spec.quantizer import QuantSpec
from .torch_quant import find_params, group_params

__all__ = ["TorchDBLLMOps", "fdb_params", "fdb_split", "fdb_dequantize", "FDBLinear", "attach_fdb", "merge_fdb",
           "fdb_modules", "dad_loss", "WEIGHTINGS", "STE_MODES"]

WEIGHTINGS = ("teacher", "teacher_student", "none")
"""DAD's token weights: the teacher's entropy, the mean of both entropies, or none (plain KD)."""

STE_MODES = ("identity", "clipped")
"""Straight-through gradient of the latent weight: everywhere, or only inside the grid's range."""


def _tensor(x, name):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise ValueError(f"{name} must be a torch tensor or a NumPy array; got {type(x).__name__}.")


def _g_idx(cols: int, group_size, device):
    idx = torch.arange(cols, device=device)
    return idx * 0 if group_size is None else idx // int(group_size)


def fdb_params(W: torch.Tensor, group_size, *, sym: bool = False, offset: str = "zero_point"):
    """:func:`refquant.spec.dbllm.fdb_params` in ``W``'s dtype (float64 gives the reference bit for bit)."""
    if offset not in OFFSETS:
        raise ValueError(f"offset must be one of {OFFSETS}; got {offset!r}.")
    rows, cols = W.shape
    if offset == "zero_point":
        spec = QuantSpec(bits=BITS, sym=sym)
        if group_size is None:
            s, z = find_params(W, spec)
            s, z = s[:, None], z[:, None]
        else:
            s, z = group_params(W, spec, int(group_size))
        s, z = s.to(W.dtype), z.to(W.dtype)
        c = s * (1.0 - z)
    else:
        n = 1 if group_size is None else -(-cols // int(group_size))
        s = torch.empty(rows, n, dtype=W.dtype, device=W.device)
        bounds = [(0, cols)] if group_size is None else [(j, min(j + int(group_size), cols))
                                                          for j in range(0, cols, int(group_size))]
        for g, (a, b) in enumerate(bounds):
            xmin = torch.clamp(W[:, a:b].amin(dim=1), max=0)
            xmax = torch.clamp(W[:, a:b].amax(dim=1), min=0)
            step = torch.maximum(xmax / 2.0, -xmin)
            s[:, g] = torch.where(step == 0, torch.ones_like(step), step)
        c = torch.zeros_like(s)
    return 2.0 * s, -s, c


def _tiles(shape, group_size):
    """``(rows, n_groups, group_size)`` when the groups tile the columns exactly (then the per-group
    parameters broadcast instead of being gathered to a full matrix), else None."""
    rows, cols = int(shape[0]), int(shape[1])
    gs = cols if group_size is None else int(group_size)
    return None if cols % gs else (rows, cols // gs, gs)


def fdb_split(W, a1, a2, c, group_size):
    """The paper's planes ``b1 = H(w - c - (a1 + a2)/2)``, ``b2 = H(-(w - c - a1 b1 - a2/2))`` (bool)."""
    tiles = _tiles(W.shape, group_size)
    if tiles is not None:  # the same elementwise arithmetic, broadcast over each group
        A1, A2, C = a1[:, :, None], a2[:, :, None], c[:, :, None]
        r = W.reshape(tiles) - C
    else:
        g = _g_idx(W.shape[1], group_size, W.device)
        A1, A2, C = a1[:, g], a2[:, g], c[:, g]
        r = W - C
    zero = torch.zeros((), dtype=A1.dtype, device=A1.device)
    b1 = (r - (A1 + A2) / 2.0) >= 0
    b2 = -(r - torch.where(b1, A1, zero) - A2 / 2.0) >= 0
    return b1.reshape(W.shape), b2.reshape(W.shape)


def fdb_dequantize(b1, b2, a1, a2, c, group_size):
    """``where(b1, a1, 0) + where(b2, a2, 0) + c`` with the groups expanded (differentiable in the scales)."""
    zero = torch.zeros((), dtype=a1.dtype, device=a1.device)
    tiles = _tiles(b1.shape, group_size)
    if tiles is not None:
        W_hat = torch.where(b1.reshape(tiles), a1[:, :, None], zero) + torch.where(b2.reshape(tiles), a2[:, :, None], zero)
        if c is not None:
            W_hat = W_hat + c[:, :, None]
        return W_hat.reshape(b1.shape)
    g = _g_idx(b1.shape[1], group_size, b1.device)
    W_hat = torch.where(b1, a1[:, g], zero) + torch.where(b2, a2[:, g], zero)
    return W_hat if c is None else W_hat + c[:, g]


class TorchDBLLMOps:
    """:class:`~refquant.backends.protocols.DBLLMOps` in torch (float64 on the weights' device)."""

    def dbllm(self, W, H=None, *, group_size=128, sym=False, offset="zero_point", steps=0,
              resplit=True) -> DualBinaryWeight:
        """:func:`refquant.dbllm` on the device: float64 scales, bool planes (torch tensors)."""
        W = _tensor(W, "W")
        check_matrix(W, "W")
        W = W.to(torch.float64)
        if H is not None:
            H = _tensor(H, "H")
            check_square(H, W.shape[1], "H")
            H = H.to(device=W.device, dtype=torch.float64)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0; got {steps!r}.")
        if sym and offset != "zero_point":
            raise ValueError("sym needs offset='zero_point' (the symmetric 2-bit grid of the zero-point initialisation).")
        with torch.no_grad():
            a1, a2, c = fdb_params(W, group_size, sym=sym, offset=offset)
            b1, b2 = fdb_split(W, a1, a2, c, group_size)
            has_c = offset == "zero_point"
            info = {"offset": offset, "sym": bool(sym), "steps": int(steps)}
            if steps:
                info["objective_init"] = _objective(W, fdb_dequantize(b1, b2, a1, a2, c if has_c else None, group_size), H)
            for _ in range(steps):
                a1, a2, c, b1, b2 = _step(W, H, b1, b2, a1, a2, c if has_c else None, group_size, resplit)
                c = c if c is not None else torch.zeros_like(a1)
            W_hat = fdb_dequantize(b1, b2, a1, a2, c if has_c else None, group_size)
            info["objective"] = _objective(W, W_hat, H)
        return DualBinaryWeight(b1, b2, a1, a2, c if has_c else None, group_size, info)


def _objective(W, W_hat, H) -> float:
    E = W - W_hat
    return float((E * E).sum() if H is None else ((E @ H) * E).sum())


def _group_sums(X, group_size, n_groups):
    g = _g_idx(X.shape[1], group_size, X.device)
    out = torch.zeros(X.shape[0], n_groups, dtype=X.dtype, device=X.device)
    return out.index_add_(1, g, X)


def _step(W, H, b1, b2, a1, a2, c, group_size, resplit):
    """:func:`refquant.spec.dbllm.fdb_step` (exact line search per row) in float64."""
    n = a1.shape[1]
    E = W - fdb_dequantize(b1, b2, a1, a2, c, group_size)
    G = -2.0 * (E if H is None else E @ H)
    zero = torch.zeros((), dtype=G.dtype, device=G.device)
    D1 = -_group_sums(torch.where(b1, G, zero), group_size, n)
    D2 = -_group_sums(torch.where(b2, G, zero), group_size, n)
    Dc = None if c is None else -_group_sums(G, group_size, n)
    dW = fdb_dequantize(b1, b2, D1, D2, Dc, group_size)
    dH = dW if H is None else dW @ H
    num, den = (E * dH).sum(dim=1), (dW * dH).sum(dim=1)
    t = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    a1, a2 = a1 + t[:, None] * D1, a2 + t[:, None] * D2
    c = None if c is None else c + t[:, None] * Dc
    if resplit:
        b1, b2 = fdb_split(W, a1, a2, torch.zeros_like(a1) if c is None else c, group_size)
    return a1, a2, c, b1, b2


# ---------------------------------------------------------------------------------------------
# Training: FDB layers with learnable scales (straight-through estimator)


class FDBLinear(torch.nn.Module):
    """A linear layer computing with FDB's weight ``a1 b1 + a2 b2 (+ c)`` of a latent weight.

    Forward: the planes are recomputed from the latent weight by the paper's Heaviside rules with
    the current scales (no gradient through the step functions); the scales get their exact
    gradients (``dW_hat/da1 = b1``, ``dW_hat/da2 = b2``, ``dW_hat/dc = 1``); the latent weight, if
    trained, gets the straight-through gradient ``dW_hat/dw = 1`` (``ste="identity"``) or 1 only
    inside the grid's range ``[c + 3 a2 / 2, c + a1 - a2 / 2]`` (``ste="clipped"``).

    Parameters are float32 (``param_dtype``); the weight is cast to the input's dtype for the matmul.
    """

    def __init__(self, weight, a1, a2, offset, group_size, bias=None, *, train_weights: bool = True,
                 train_scales: bool = True, ste: str = "identity", param_dtype=torch.float32):
        super().__init__()
        if ste not in STE_MODES:
            raise ValueError(f"ste must be one of {STE_MODES}; got {ste!r}.")
        dev = weight.device
        self.weight = torch.nn.Parameter(weight.detach().to(param_dtype).clone(), requires_grad=train_weights)
        self.a1 = torch.nn.Parameter(_tensor(a1, "a1").to(dev, param_dtype).clone(), requires_grad=train_scales)
        self.a2 = torch.nn.Parameter(_tensor(a2, "a2").to(dev, param_dtype).clone(), requires_grad=train_scales)
        self.offset = None if offset is None else torch.nn.Parameter(
            _tensor(offset, "offset").to(dev, param_dtype).clone(), requires_grad=train_scales)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.group_size = None if group_size is None else int(group_size)
        self.ste = ste
        self.register_buffer("_g", _g_idx(weight.shape[1], group_size, dev), persistent=False)

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def planes(self):
        with torch.no_grad():
            c = self.offset if self.offset is not None else torch.zeros_like(self.a1)
            return fdb_split(self.weight, self.a1, self.a2, c, self.group_size)

    def quantized_weight(self):
        """FDB's weight with the straight-through path to the latent weight (see the class)."""
        b1, b2 = self.planes()
        W_q = fdb_dequantize(b1, b2, self.a1, self.a2, self.offset, self.group_size)
        if not self.weight.requires_grad:
            return W_q
        through = self.weight - self.weight.detach()  # exactly 0 forward, gradient 1 backward
        if self.ste == "clipped":
            with torch.no_grad():
                c = self.offset[:, self._g] if self.offset is not None else 0.0
                lo = c + 1.5 * self.a2[:, self._g]
                hi = c + self.a1[:, self._g] - 0.5 * self.a2[:, self._g]
                inside = (self.weight >= torch.minimum(lo, hi)) & (self.weight <= torch.maximum(lo, hi))
            through = through * inside
        return W_q + through

    def forward(self, x):
        W = self.quantized_weight()
        return F.linear(x, W.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_format(self) -> DualBinaryWeight:
        """The current weight as a :class:`~refquant.spec.formats.DualBinaryWeight` (NumPy, host)."""
        b1, b2 = self.planes()
        host = lambda t: t.detach().cpu().numpy()  # noqa: E731
        return DualBinaryWeight(host(b1), host(b2), host(self.a1), host(self.a2),
                                None if self.offset is None else host(self.offset), self.group_size,
                                {"offset": "zero_point" if self.offset is not None else "none"})


def fdb_modules(model) -> dict[str, FDBLinear]:
    """The :class:`FDBLinear` modules of ``model`` by their qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FDBLinear)}


def _set_module(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def attach_fdb(model, init: dict, *, train_weights: bool = True, train_scales: bool = True,
               ste: str = "identity") -> dict[str, FDBLinear]:
    """Replace each ``nn.Linear`` named in ``init`` by an :class:`FDBLinear` started from ``init[name]``
    (a :class:`~refquant.spec.formats.DualBinaryWeight` of that linear, any array library). The
    latent weight is the linear's own weight. Returns the new modules by name."""
    out = {}
    for name, fmt in init.items():
        lin = model.get_submodule(name)
        if not isinstance(lin, torch.nn.Linear):
            raise ValueError(f"{name} is a {type(lin).__name__}, not a torch.nn.Linear; FDB replaces linears only.")
        if tuple(fmt.shape) != tuple(lin.weight.shape):
            raise ValueError(f"{name}: the FDB init has shape {fmt.shape}, the linear {tuple(lin.weight.shape)}.")
        mod = FDBLinear(lin.weight, fmt.a1, fmt.a2, fmt.offset, fmt.group_size, lin.bias, train_weights=train_weights,
                        train_scales=train_scales, ste=ste)
        _set_module(model, name, mod)
        out[name] = mod
    return out


def merge_fdb(model, dtype=None) -> dict[str, DualBinaryWeight]:
    """Replace every :class:`FDBLinear` of ``model`` by an ``nn.Linear`` holding its dequantized FDB weight
    (``dtype``: the latent weight's, by default); returns the final formats by name."""
    formats = {}
    for name, mod in fdb_modules(model).items():
        fmt = mod.to_format()
        formats[name] = fmt
        with torch.no_grad():
            W = fdb_dequantize(*mod.planes(), mod.a1, mod.a2, mod.offset, mod.group_size)
        lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                              device=W.device, dtype=dtype or W.dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        _set_module(model, name, lin)
    return formats


# ---------------------------------------------------------------------------------------------
# Deviation-Aware Distillation


def dad_loss(student_logits, teacher_logits, *, weighting: str = "teacher", gamma: float = 1.0,
             temperature: float = 1.0, normalize: bool = True, mask=None):
    """DAD: per-token ``KL(p_T || p_S)`` weighted by the ambiguity (entropy) of the prediction.

    ``p_T = softmax(z_T / temperature)``, ``p_S`` likewise; per token ``i`` the weight is
    ``w_i = H(p_T,i)^gamma`` (``weighting="teacher"``), ``((H(p_T,i) + H(p_S,i)) / 2)^gamma``
    (``"teacher_student"``, the student's entropy detached) or 1 (``"none"``: plain distillation);
    with ``normalize`` the weights are divided by their mean over the (masked) tokens, so the loss
    stays on the scale of plain KD. Weights carry no gradient. Loss =
    ``temperature^2 * sum_i w_i KL_i / n_tokens``. Entropies in nats. ``mask``: bool (tokens kept).

    Returns ``(loss, stats)``; ``stats`` holds the plain mean KL, mean teacher entropy and the
    weights' max/mean ratio (Python floats).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}.")
    if not temperature > 0 or not gamma >= 0:
        raise ValueError(f"temperature must be > 0 and gamma >= 0; got {temperature}, {gamma}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}.")
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V).float() / temperature
    t = teacher_logits.reshape(-1, V).float().detach() / temperature
    if mask is not None:
        keep = mask.reshape(-1)
        s, t = s[keep], t[keep]
    log_ps, log_pt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    pt = log_pt.exp()
    kl = (pt * (log_pt - log_ps)).sum(dim=-1)
    with torch.no_grad():
        ent_t = -(pt * log_pt).sum(dim=-1)
        if weighting == "teacher":
            w = ent_t.clamp_min(0) ** gamma
        elif weighting == "teacher_student":
            ent_s = -(log_ps.exp() * log_ps).sum(dim=-1)
            w = ((ent_t + ent_s) / 2).clamp_min(0) ** gamma
        else:
            w = torch.ones_like(kl)
        if normalize:
            w = w / w.mean().clamp_min(torch.finfo(w.dtype).tiny)
    loss = temperature ** 2 * (w * kl).mean()
    check_finite(loss.detach(), "the DAD loss")
    stats = {"kl": float(kl.detach().mean()), "teacher_entropy": float(ent_t.mean()),
             "weight_max_over_mean": float(w.max() / w.mean().clamp_min(1e-30)) if w.numel() else math.nan}
    return loss, stats
