"""DB-LLM's training stage: Deviation-Aware Distillation (DAD) of an FDB-quantized LLaMA from its FP teacher.

    refquant quantize --method dbllm --wbits 2 --group-size 128 --out runs/dbllm-init
    refquant distill --model golden/models/tiny-llama3 --init runs/dbllm-init --out runs/dbllm-dad \\
        --steps 200 --train-seqlen 512 --eval wikitext2,c4,ptb

Chen et al. 2024 (DB-LLM, arXiv 2402.11960, Sec. 3.3) train the FDB scales end to end with the FP
model as teacher and a distillation loss that weights each prediction by its ambiguity (entropy).
The authors released no code: this is a re-implementation, and every choice the paper leaves open
(or that could not be checked against its text) is a setting of :class:`DistillConfig`, documented
in ``docs/methods/dbllm.md``.

The stage:

1. the teacher is the FP checkpoint (``--model``); the student is a copy whose linears become
   :class:`~refquant.backends.torch_dbllm.FDBLinear` (latent weight = the FP weight; scales from the
   ``refquant quantize --method dbllm`` output given as ``--init``, else FDB's initialisation
   computed here with the same settings);
2. training windows: ``nsamples`` windows of ``train_seqlen`` tokens from the calibration split
   (``data.get_calibration``: WikiText-2 train by default); each step takes ``batch_size`` of them
   in a seeded per-epoch permutation (local generators only);
3. the loss is :func:`~refquant.backends.torch_dbllm.dad_loss` over every position of the batch;
   AdamW on the latent weights (``lr``) and the scales (``scale_lr``), optional warm-up and cosine
   decay, gradient-norm clipping; everything else (embeddings, norms, head) stays frozen;
4. ``out/distill/checkpoint.pt`` (trainable tensors, optimizer state, step, loss history, settings
   signature) is written every ``save_every`` steps and at the end; ``--resume`` continues from it
   with the identical trajectory (the batch order depends only on the seed and the step);
5. the result: the dequantized student (transformers-loadable, ``model.safetensors``), the final
   FDB formats per layer (``quantized/layer_XXX.{safetensors,json}``, learned scales),
   ``distill/loss.json`` and ``distill/loss.png`` (the curve), ``results.json`` with the perplexity
   before (the FDB init) and after distillation.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import data, runs
from .provenance import portable_path, provenance, write_json_atomic
from .spec import formats, llama, safetensors_io
from .spec.dbllm import OFFSETS
from .spec.formats import DualBinaryWeight
from .spec.progress import progress

try:  # the training stage needs torch; the rest of refquant (and the CLI) runs without it
    import torch

    from .backends import torch_dbllm
except ImportError:  # pragma: no cover - depends on the machine
    torch = None
    torch_dbllm = None

try:  # the loss curve is drawn with matplotlib's object API (no pyplot global state) when it is installed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:  # pragma: no cover - depends on the machine
    Figure = FigureCanvasAgg = None

log = logging.getLogger("refquant")

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class DistillConfig:
    """Settings of the DAD stage (none comes from released code: each is a documented choice)."""

    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "windows per step"})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate of the latent weights"})
    scale_lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate of the FDB scales a1, a2 (and offset)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    schedule: str = field(default="cosine", metadata={"help": "learning-rate schedule: cosine (to 0) or constant"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = no clipping)"})
    weighting: str = field(default="teacher", metadata={
        "help": "DAD token weights: teacher (teacher entropy^gamma), teacher_student (mean of both), none (plain KD)"})
    gamma: float = field(default=1.0, metadata={"help": "exponent of the entropy weight"})
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature"})
    normalize: bool = field(default=True, metadata={"help": "divide the token weights by their batch mean"})
    ste: str = field(default="identity", metadata={"help": "straight-through gradient of the latent weight: identity "
                                                           "or clipped (zero outside the grid's range)"})
    train_weights: bool = field(default=True, metadata={"help": "train the latent weights (planes may flip)"})
    train_scales: bool = field(default=True, metadata={"help": "train the FDB scales"})
    seed: int = field(default=0, metadata={"help": "seed of the batch order"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps"})

    def __post_init__(self):
        for name in ("steps", "batch_size", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}.")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {self.warmup_steps!r}.")
        if not (self.lr >= 0 and self.scale_lr >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0):
            raise ValueError("lr, scale_lr, weight_decay and grad_clip must be >= 0.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {self.schedule!r}.")
        if self.weighting not in ("teacher", "teacher_student", "none"):
            raise ValueError(f"weighting must be teacher, teacher_student or none; got {self.weighting!r}.")
        if self.ste not in ("identity", "clipped"):
            raise ValueError(f"ste must be identity or clipped; got {self.ste!r}.")
        if not self.gamma >= 0 or not self.temperature > 0:
            raise ValueError(f"gamma must be >= 0 and temperature > 0; got {self.gamma}, {self.temperature}.")
        if not (self.train_weights or self.train_scales):
            raise ValueError("nothing to train: keep train_weights or train_scales on.")


def _need_torch():
    if torch is None:
        raise ImportError("refquant distill needs torch and transformers: pip install -e '.[torch]'.")


# ---------------------------------------------------------------------------------------------
# The student


def layer_linear_names(n_layers: int) -> list[str]:
    """Qualified names of every decoder linear of a ``LlamaForCausalLM`` (``model.layers.3.mlp.up_proj``)."""
    return [f"model.layers.{i}.{name}" for i in range(n_layers) for name in llama.LINEARS]


def read_init(init_dir: str | os.PathLike, n_layers: int) -> tuple[dict, dict]:
    """The FDB formats of a ``refquant quantize --method dbllm`` output: ``({qualified name: fmt}, recipe)``."""
    init_dir = Path(init_dir)
    recipe_path = init_dir / "refquant.json"
    if not recipe_path.exists():
        raise FileNotFoundError(f"{init_dir} is not a refquant quantize output (no refquant.json); run "
                                "`refquant quantize --method dbllm --wbits 2 --out DIR` first.")
    recipe = json.loads(recipe_path.read_text())
    method = (recipe.get("config") or {}).get("method")
    if method != "dbllm":
        raise ValueError(f"{init_dir} was quantized with --method {method}; distillation starts from a dbllm output.")
    out = {}
    for i in range(n_layers):
        meta_path = init_dir / "quantized" / f"layer_{i:03d}.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} is missing: the quantize run in {init_dir} is incomplete "
                                    "(continue it with --resume).")
        meta = json.loads(meta_path.read_text())
        t = safetensors_io.read(init_dir / "quantized" / f"layer_{i:03d}.safetensors")
        for name in llama.LINEARS:
            prefix = name + "."
            fmt = formats.from_tensors({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)},
                                       meta["formats"][name])
            if not isinstance(fmt, DualBinaryWeight):
                raise ValueError(f"{init_dir}: layer {i} {name} holds a {type(fmt).__name__}, not a DualBinaryWeight.")
            out[f"model.layers.{i}.{name}"] = fmt
    return out, recipe


def fdb_init(model, *, group_size=128, sym: bool = False, offset: str = "zero_point") -> dict:
    """FDB's initialisation of every decoder linear of ``model`` (the torch twin, float64)."""
    _need_torch()
    ops = torch_dbllm.TorchDBLLMOps()
    n = model.config.num_hidden_layers
    return {name: ops.dbllm(model.get_submodule(name).weight, group_size=group_size, sym=sym, offset=offset)
            for name in layer_linear_names(n)}


def make_student(teacher, init: dict, cfg: DistillConfig):
    """A copy of ``teacher`` with FDB linears from ``init``; only their latent weights / scales train."""
    _need_torch()
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(False)
    torch_dbllm.attach_fdb(student, init, train_weights=cfg.train_weights, train_scales=cfg.train_scales, ste=cfg.ste)
    return student.eval()


# ---------------------------------------------------------------------------------------------
# Training


def batch_indices(step: int, batch_size: int, n_windows: int, seed: int) -> np.ndarray:
    """The windows of ``step``: positions ``step * batch_size ...`` of a per-epoch permutation seeded by
    ``(seed, epoch)`` (local generators; independent of everything but these four numbers)."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size)
    out = np.empty(batch_size, dtype=np.int64)
    for k, p in enumerate(pos):
        epoch, r = divmod(int(p), n_windows)
        out[k] = np.random.default_rng([seed, epoch]).permutation(n_windows)[r]
    return out


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """Warm-up (linear from 1/(warmup+1)) then constant or cosine decay to 0 over the remaining steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - cfg.warmup_steps) / span))


def _signature(cfg: DistillConfig, windows: np.ndarray, init_names: list[str]) -> dict:
    return {"config": dataclasses.asdict(cfg), "windows_sha256": hashlib.sha256(np.ascontiguousarray(windows)).hexdigest(),
            "windows_shape": list(windows.shape), "linears": len(init_names)}


def _trainable(student) -> dict:
    return {n: p for n, p in student.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, student, opt, step: int, history: list, signature: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "params": {n: p.detach().cpu().clone() for n, p in _trainable(student).items()},
             "optimizer": opt.state_dict(), "history": history, "signature": signature}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def distill(teacher, student, windows: np.ndarray, cfg: DistillConfig, out_dir: str | os.PathLike | None = None,
            resume: bool = False, device: str = "cpu", stop_after: int | None = None) -> list[dict]:
    """Train ``student``'s FDB layers against ``teacher`` on token ``windows`` (n, seqlen) with DAD.

    With ``out_dir``, ``out_dir/distill/checkpoint.pt`` is written every ``cfg.save_every`` steps
    and at the end, and ``resume`` continues from it (settings and windows must match).
    ``stop_after``: return after this many steps of this call (a simulated interruption, for tests).
    Returns the loss history (one dict per step: ``step, loss, kl, teacher_entropy, lr_factor``).
    """
    _need_torch()
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n_windows >= 1, seqlen >= 2) token ids; got shape {windows.shape}.")
    modules = torch_dbllm.fdb_modules(student)
    if not modules:
        raise ValueError("the student has no FDB linears; build it with make_student(teacher, init, cfg).")
    teacher.eval()
    student.eval()  # no dropout: the trajectory is deterministic
    weights = [m.weight for m in modules.values() if m.weight.requires_grad]
    scales = [p for m in modules.values() for p in (m.a1, m.a2, m.offset) if p is not None and p.requires_grad]
    groups = [g for g in ({"params": weights, "lr": cfg.lr, "base_lr": cfg.lr},
                          {"params": scales, "lr": cfg.scale_lr, "base_lr": cfg.scale_lr}) if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    signature = _signature(cfg, windows, list(modules))
    ckpt = Path(out_dir) / "distill" / "checkpoint.pt" if out_dir is not None else None
    start, history = 0, []
    if ckpt is not None and ckpt.exists():
        if not resume:
            raise FileExistsError(f"{ckpt} exists: pass --resume to continue that distillation or choose another --out.")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["signature"] != json.loads(json.dumps(signature)):
            raise ValueError(f"--resume: {ckpt} was made with other settings or data:\n  saved: {state['signature']}\n"
                             f"  now:   {signature}")
        params = _trainable(student)
        with torch.no_grad():
            for n, t in state["params"].items():
                params[n].copy_(t.to(params[n].device))
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), list(state["history"])
        log.info("resuming distillation at step %d", start)
    stop = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    trainable = weights + scales
    for step in progress(range(start, stop), total=stop - start, desc="DAD steps"):
        f = lr_factor(step, cfg)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        ids = torch.as_tensor(windows[batch_indices(step, cfg.batch_size, windows.shape[0], cfg.seed)], device=device)
        with torch.no_grad():
            t_logits = teacher(ids).logits
        s_logits = student(ids).logits
        loss, stats = torch_dbllm.dad_loss(s_logits, t_logits, weighting=cfg.weighting, gamma=cfg.gamma,
                                           temperature=cfg.temperature, normalize=cfg.normalize)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), "lr_factor": f, **stats})
        done = step + 1
        if ckpt is not None and (done % cfg.save_every == 0 or done == stop):
            _save_checkpoint(ckpt, student, opt, done, history, signature)
    return history


def plot_loss(history: list[dict], path: str | os.PathLike, title: str = "DB-LLM Deviation-Aware Distillation") -> bool:
    """The loss curve (DAD loss and plain KL per step) as a PNG; False when matplotlib is missing."""
    if Figure is None or not history:
        return False
    steps = [h["step"] for h in history]
    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, [h["loss"] for h in history], label="DAD loss (weighted KL)")
    ax.plot(steps, [h["kl"] for h in history], label="KL(teacher || student)", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


# ---------------------------------------------------------------------------------------------
# The stage as a whole (the CLI's `refquant distill`)


def write_formats(out_dir: Path, student, fmts: dict) -> None:
    """``out/quantized/layer_XXX.{safetensors,json}``: the final FDB formats and the layer's norms."""
    n = student.config.num_hidden_layers
    qdir = Path(out_dir) / "quantized"
    qdir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        tensors, metas = {}, {}
        layer = student.model.layers[i]
        for name in llama.LINEARS:
            parts, metas[name] = fmts[f"model.layers.{i}.{name}"].to_tensors()
            tensors.update({f"{name}.{k}": v for k, v in parts.items()})
        for name in llama.NORMS:
            w = layer.get_submodule(name).weight.detach().cpu()
            tensors[name] = (w.float() if w.dtype in (torch.bfloat16, torch.float16) else w).numpy()
        safetensors_io.write(qdir / f"layer_{i:03d}.safetensors", tensors)
        write_json_atomic(qdir / f"layer_{i:03d}.json", {"index": i, "info": {}, "act_quant": {}, "formats": metas})


def run(a) -> dict:
    """``refquant distill``: see the module docstring. Returns the results record (also in ``out/results.json``)."""
    _need_torch()
    cfg = DistillConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(DistillConfig)})
    if a.backend == "numpy":
        raise ValueError("refquant distill trains with torch; use --backend torch (or auto).")
    out = Path(a.out)
    timings = {}
    t = time.perf_counter()
    loaded = runs.load(a.model, "torch", a.device, a.dtype)
    teacher = loaded.model.to(loaded.device)
    timings["load"] = time.perf_counter() - t
    n_layers = teacher.config.num_hidden_layers
    if a.init:
        init, recipe = read_init(a.init, n_layers)
        fdb = {k: recipe["config"].get(k) for k in ("group_size", "sym")}
        fdb["offset"] = (recipe["config"].get("options") or {}).get("fdb_offset")
        src = recipe.get("source_model")
        if src is not None and Path(src).resolve() != Path(portable_path(loaded.source)).resolve():
            log.warning("--init was quantized from %s, the teacher is %s", src, portable_path(loaded.source))
    else:
        fdb = {"group_size": a.group_size, "sym": a.sym, "offset": a.fdb_offset}
        init = fdb_init(teacher, **fdb)
    student = make_student(teacher, init, cfg)
    seqlen = a.train_seqlen or a.seqlen
    t = time.perf_counter()
    windows, calib_info = data.get_calibration(a.calib, loaded.encode, nsamples=a.nsamples, seqlen=seqlen, seed=a.seed,
                                               data_dir=a.data_dir)
    timings["training_data"] = time.perf_counter() - t
    cache: dict = {}

    def evaluate(model) -> dict:
        if not a.eval:
            return {}
        lm = runs.LoadedModel("torch", model, loaded.encode, loaded.source, loaded.device, loaded.dtype,
                              loaded.config_json)
        return runs.evaluate_ppl(lm, a.eval, a.seqlen, a.data_dir, a.max_eval_windows, a.batch_size, token_cache=cache)

    ppl_before = {}
    if a.eval and not a.no_eval_before:
        t = time.perf_counter()
        before = copy.deepcopy(student)
        torch_dbllm.merge_fdb(before, dtype=next(teacher.parameters()).dtype)
        ppl_before = evaluate(before)
        del before
        timings["eval_before"] = time.perf_counter() - t
    t = time.perf_counter()
    history = distill(teacher, student, windows, cfg, out_dir=out, resume=a.resume, device=loaded.device)
    timings["distill"] = time.perf_counter() - t
    write_json_atomic(out / "distill" / "loss.json", history)
    plotted = plot_loss(history, out / "distill" / "loss.png")
    fmts = torch_dbllm.merge_fdb(student, dtype=next(teacher.parameters()).dtype)
    write_formats(out, student, fmts)
    t = time.perf_counter()
    runs.save_model(runs.LoadedModel("torch", student, loaded.encode, loaded.source, loaded.device, loaded.dtype,
                                      loaded.config_json), out,
                    {"config": {"method": "dbllm", "wbits": 2, **fdb, "distill": dataclasses.asdict(cfg)},
                     "act_quant": {}, "source_model": portable_path(loaded.source)})
    timings["save"] = time.perf_counter() - t
    t = time.perf_counter()
    ppl_after = evaluate(student)
    timings["eval_after"] = time.perf_counter() - t
    f0 = next(iter(fmts.values()))
    record = {
        "provenance": provenance(loaded.device), "model": portable_path(loaded.source), "backend": "torch",
        "dtype": loaded.dtype, "init": portable_path(a.init) if a.init else None, "fdb": fdb,
        "distill": dataclasses.asdict(cfg), "training_data": calib_info, "train_seqlen": seqlen,
        "bits": {"paper": f0.bits_per_weight,
                 "stored": sum(f.storage_bits for f in fmts.values()) / sum(f.numel for f in fmts.values())},
        "loss": {"first": history[0] if history else None, "last": history[-1] if history else None,
                 "png": "distill/loss.png" if plotted else None},
        "perplexity_before": ppl_before, "perplexity": ppl_after, "timings_s": timings,
    }
    write_json_atomic(out / "results.json", record)
    return record


def add_parser(sub, add_common, datasets_type) -> None:
    """The ``refquant distill`` subcommand (called by ``refquant/cli.py`` with its shared helpers)."""
    d = sub.add_parser("distill", help="DB-LLM: train the FDB scales by Deviation-Aware Distillation from the FP model")
    d.add_argument("--model", default=str(runs.DEFAULT_MODEL), help="the FP checkpoint (the teacher)")
    d.add_argument("--init", default=None, help="a `refquant quantize --method dbllm` output to start from "
                                                "(default: compute FDB's initialisation here)")
    d.add_argument("--group-size", type=lambda s: None if int(s) <= 0 else int(s), default=128,
                   help="without --init: FDB group size (-1 = per row)")
    d.add_argument("--sym", action="store_true", help="without --init: symmetric 2-bit initial grid")
    d.add_argument("--fdb-offset", default="zero_point", choices=OFFSETS, help="without --init: the FDB offset")
    d.add_argument("--calib", default="wikitext2", choices=["wikitext2", "ptb", "c4"], help="training data (train split)")
    d.add_argument("--nsamples", type=int, default=128, help="training windows")
    d.add_argument("--train-seqlen", type=int, default=None, help="tokens per training window (default: --seqlen)")
    d.add_argument("--seed", type=int, default=0, help="seed of the window draw")
    d.add_argument("--out", required=True)
    d.add_argument("--resume", action="store_true", help="continue from out/distill/checkpoint.pt")
    d.add_argument("--eval", type=datasets_type, default=[], help="perplexity before and after, e.g. wikitext2,c4,ptb")
    d.add_argument("--no-eval-before", action="store_true", help="skip the perplexity of the FDB init")
    d.add_argument("--max-eval-windows", type=int, default=None)
    g = d.add_argument_group("distillation settings (DistillConfig)")
    for f in dataclasses.fields(DistillConfig):
        flag = "--" + ("distill-" + f.name if f.name in ("seed", "batch_size") else f.name).replace("_", "-")
        if f.type in (bool, "bool"):
            if f.default:
                g.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", default=True,
                               help="turn off: " + f.metadata["help"])
            else:
                g.add_argument(flag, dest=f.name, action="store_true", default=False, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            g.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f"{f.metadata['help']}; default {f.default}")
    add_common(d)
    d.set_defaults(func=lambda a: (print(json.dumps(_summary(run(a)), indent=1, default=str)), 0)[1])


def _summary(record: dict) -> dict:
    return {"perplexity_before": {k: v["ppl"] for k, v in record["perplexity_before"].items()},
            "perplexity": {k: v["ppl"] for k, v in record["perplexity"].items()},
            "loss_first": (record["loss"]["first"] or {}).get("loss"), "loss_last": (record["loss"]["last"] or {}).get("loss"),
            "bits": record["bits"], "timings_s": record["timings_s"]}


__all__ = ["DistillConfig", "SCHEDULES", "batch_indices", "distill", "fdb_init", "layer_linear_names", "lr_factor",
           "make_student", "plot_loss", "read_init", "run", "write_formats", "add_parser"]
