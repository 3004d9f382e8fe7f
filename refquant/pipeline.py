"""The sequential layer-wise quantization loop of the GPTQ lineage, with pluggable methods.

The loop of IST-DASLab/gptq ``llama_sequential`` (notes, section 0.3), written once for every
method and every backend:

1. the calibration windows are embedded: the inputs of decoder layer 0;
2. for each decoder layer: the layer is run on every calibration sample with hooks on the linears'
   inputs, which accumulate the statistics the method needs (Hessians for GPTQ, channel absmax
   for SmoothQuant, mean |x| / cached inputs for AWQ, ranges and means for AWEQ) -- one set per
   *distinct* input: q/k/v share ``attn_in``, gate/up share ``mlp_in``;
3. the method quantizes the layer (and may rescale its norms, add biases, choose activation
   quantizers);
4. the layer is run again and its outputs become the next layer's inputs -- through the
   *quantized* layer (GPTQ: errors propagate) or the *FP* layer (AWQ, SmoothQuant, AWEQ: their
   statistics come from the FP model, as in the originals).

``true_sequential`` (GPTQ ``--true-sequential``) quantizes ``[k, v, q]``, ``[o]``, ``[up, gate]``,
``[down]`` in turn, each with a fresh statistics pass through the partially quantized layer.

A *runner* adapts a model to the loop (:class:`NumpyRunner` for the NumPy reference LLaMA; the
torch runner in ``backends/torch_pipeline.py`` for Hugging Face models), and an *ops* object (a
backend from ``backends.get_backend``) supplies the array algorithms. A method is a class with
``quantize_layer(ctx)``; new methods register in :data:`METHODS` without touching the loop.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import numpy as np

from . import llama
from .progress import progress
from .quantizer import QuantizedWeight, QuantSpec

log = logging.getLogger("refquant")

Q, K, V, O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
INPUT_LINEARS = {"attn_in": (Q, K, V), "o_in": (O,), "mlp_in": (GATE, UP), "down_in": (DOWN,)}
"""The distinct linear inputs of a LLaMA decoder layer and the linears that read each."""
INPUT_OF = {name: group for group, names in INPUT_LINEARS.items() for name in names}
NORM_OF = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}
"""The RMSNorm that produces an input (where a per-channel scale can be folded)."""
TRUE_SEQUENTIAL = ((K, V, Q), (O,), (UP, GATE), (DOWN,))
"""Quantization order of GPTQ's ``--true-sequential`` (``llama.py``)."""


class CalibrationOverflow(FloatingPointError):
    """Non-finite activations during calibration (fp16/bf16 overflow, NaN/Inf weights), with the
    layer and linear where they first appear."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides a quantized model (recorded in every result).

    Weight quantizer: ``wbits``, ``group_size`` (``None`` = per output channel), ``sym``.
    GPTQ: ``act_order``, ``static_groups``, ``true_sequential``, ``percdamp``, ``blocksize``,
    ``max_percdamp`` (opt-in damping escalation). Activations: ``abits`` (16 = not quantized),
    ``act_mode`` (``per_token`` | ``per_tensor`` | ``per_tensor_static``), ``quantize_bmm_input``
    (SmoothQuant: per-token quantize the q/k/v outputs). SmoothQuant: ``alpha``. AWQ:
    ``duo_scaling`` (the first release's scale formula), ``awq_clip``, ``awq_search_samples`` (opt-in:
    the attention / MLP scale searches replay only the first that many calibration sequences;
    ``None`` = all, the faithful default). AWEQ: ``awe``, ``bc``,
    ``aweq_per_tensor``.
    """

    method: str = "gptq"
    wbits: int = 4
    group_size: int | None = 128
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    max_percdamp: float | None = None
    abits: int = 16
    act_mode: str = "per_token"
    quantize_bmm_input: bool = False
    alpha: float = 0.85
    duo_scaling: bool = False
    awq_clip: bool = True
    awq_search_samples: int | None = None
    awe: bool = True
    bc: bool = True
    aweq_per_tensor: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; available: {sorted(METHODS)}.")
        if self.abits != 16 and not 2 <= self.abits <= 8:
            raise ValueError(f"abits must be 16 (no activation quantization) or 2..8; got {self.abits}.")
        if self.act_mode not in ("per_token", "per_tensor", "per_tensor_static"):
            raise ValueError(f"act_mode must be per_token, per_tensor or per_tensor_static; got {self.act_mode!r}.")
        if self.awq_search_samples is not None and (
                isinstance(self.awq_search_samples, bool) or not isinstance(self.awq_search_samples, int)
                or self.awq_search_samples < 1):
            raise ValueError(f"awq_search_samples must be a positive int (calibration sequences) or None (all); "
                             f"got {self.awq_search_samples!r}.")
        self.weight_spec()  # validates wbits/group_size

    def weight_spec(self) -> QuantSpec:
        return METHODS[self.method].weight_spec(self)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Runners and ops (protocols)


class Runner(Protocol):
    """Adapts a model to the loop. Arrays are the runner's own (NumPy, or torch on a device)."""

    config: llama.LlamaConfig
    ops: object

    def embed(self, ids: np.ndarray): ...
    def load_layer(self, i: int): ...
    def finish_layer(self, i: int, layer) -> None: ...
    def forward(self, layer, acts, hooks: llama.LinearHooks | None = None, keep_output: bool = True): ...
    def block(self, layer, kind: str, x, weights: dict): ...
    def get(self, layer, name: str): ...
    def set(self, layer, name: str, value) -> None: ...


@dataclass(frozen=True)
class ActQuant:
    """Fake quantization of one linear's input (and, for ``quantize_output``, its output)."""

    bits: int
    mode: str = "per_token"
    static_scale: float | None = None
    quantize_output: bool = False


# ---------------------------------------------------------------------------------------------
# The per-layer context a method works with


class StageTimer:
    """Wall time per pipeline stage; synchronizes the device (``runner.sync``) at stage edges."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync or (lambda: None)
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                timer.sync()
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.sync()
                timer.add(name, time.perf_counter() - self.t)

        return _Stage()


@dataclass
class LayerContext:
    index: int
    layer: object
    runner: Runner
    config: QuantConfig
    inputs: object
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    act_quant: dict[str, ActQuant] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    timer: StageTimer = field(default_factory=StageTimer)
    prefetched: tuple | None = None  # (requests, stats) gathered during the FP propagation pass

    @property
    def ops(self):
        return self.runner.ops

    def get(self, name: str):
        """A weight (``self_attn.q_proj``), norm gain (``input_layernorm``) or bias (``...bias``)."""
        return self.runner.get(self.layer, name)

    def set(self, name: str, value) -> None:
        self.runner.set(self.layer, name, value)

    def set_quantized(self, name: str, qw: QuantizedWeight) -> None:
        """Replace linear ``name`` by its dequantized weight and keep the codes for saving."""
        self.quantized[name] = qw
        self.set(name, qw.dequantize())

    def collect(self, requests: dict[str, tuple[str, ...]], keep_output: bool = False):
        """Run the layer (as it is now) on all calibration inputs; return per-input statistics.

        ``requests`` maps an input group (``attn_in``, ``o_in``, ``mlp_in``, ``down_in``) to the
        statistics wanted there (kinds understood by ``ops.channel_stats``: ``"H"``,
        ``"absmax"``, ``"mean_abs"``, ``"minmax"``, ``"mean"``, ``"inputs"``). With
        ``keep_output`` the layer's outputs are returned too: ``(stats, outputs)``. Statistics the
        loop already gathered for exactly these requests during the FP pass are handed out once
        (see :meth:`Method.first_statistics`).
        """
        if self.prefetched is not None and self.prefetched[0] == requests and not keep_output:
            stats, self.prefetched = self.prefetched[1], None
            return stats
        first = {group: INPUT_LINEARS[group][0] for group in requests}
        stats = {group: self.ops.channel_stats(kinds, self.runner.in_features(group)) for group, kinds in requests.items()}
        wanted = {name: group for group, name in first.items()}
        timer = self.timer
        t_stats = [0.0]

        def on_input(name, x):
            if name in wanted:
                timer.sync()
                t = time.perf_counter()
                try:
                    stats[wanted[name]].add(x)
                except ValueError as e:
                    if "non-finite" not in str(e):
                        raise
                    raise CalibrationOverflow(
                        f"non-finite activations at the input of model.layers.{self.index}.{name} ({e}) -- "
                        "fp16 overflows above 65504: run in bfloat16 or float32, or check the weights."
                    ) from None
                timer.sync()
                t_stats[0] += time.perf_counter() - t
            return self._act_hook(name, x)

        with timer.stage("calibration_forward"):
            out = self.runner.forward(self.layer, self.inputs,
                                      llama.LinearHooks(on_input=on_input, on_output=self._out_hook),
                                      keep_output=keep_output)
        timer.add("calibration_forward", -t_stats[0])
        timer.add("statistics", t_stats[0])
        return (stats, out) if keep_output else stats

    def hooks(self) -> llama.LinearHooks:
        """The activation quantizers chosen so far (used when propagating through this layer)."""
        return llama.LinearHooks(on_input=self._act_hook, on_output=self._out_hook)

    def _act_hook(self, name, x):
        aq = self.act_quant.get(name)
        return x if aq is None else self.ops.quantize_activation(x, aq.bits, aq.mode, aq.static_scale)

    def _out_hook(self, name, y):
        aq = self.act_quant.get(name)
        return y if aq is None or not aq.quantize_output else self.ops.quantize_activation(y, aq.bits, "per_token")


# ---------------------------------------------------------------------------------------------
# Methods


class Method:
    """Base class: a method quantizes one decoder layer in :meth:`quantize_layer`."""

    name = "?"
    needs_calibration = True
    propagate = "quantized"  # or "fp": next-layer inputs from the unquantized layer

    @staticmethod
    def weight_spec(config: QuantConfig) -> QuantSpec:
        return QuantSpec(bits=config.wbits, group_size=config.group_size, sym=config.sym)

    def quantize_layer(self, ctx: LayerContext) -> None:
        raise NotImplementedError

    def first_statistics(self, ctx: LayerContext) -> dict | None:
        """For ``propagate = "fp"``: the requests of the method's first :meth:`LayerContext.collect`.

        The loop then gathers them in the same pass that computes the next layer's inputs from the
        FP layer (one layer forward instead of two); the method's ``collect`` with exactly these
        requests receives them. None: no fusion.
        """
        return None

    @staticmethod
    def choose_act_quant(ctx: LayerContext, absmax: dict | None = None) -> None:
        """Record activation quantizers for every linear when ``abits < 16``."""
        cfg = ctx.config
        if cfg.abits == 16:
            return
        for name in llama.LINEARS:
            static = None
            if cfg.act_mode == "per_tensor_static":
                static = ctx.ops.static_act_scale(absmax[INPUT_OF[name]], cfg.abits)
            mode = "per_token" if cfg.act_mode == "per_token" else "per_tensor"
            ctx.act_quant[name] = ActQuant(cfg.abits, mode, static,
                                           quantize_output=cfg.quantize_bmm_input and name in (Q, K, V))


class RTN(Method):
    """Round-to-nearest every linear (:func:`refquant.rtn`); no calibration data."""

    name = "rtn"
    needs_calibration = False

    def quantize_layer(self, ctx):
        spec = ctx.config.weight_spec()
        for name in llama.LINEARS:
            ctx.set_quantized(name, ctx.ops.rtn(ctx.get(name), spec))


class GPTQ(Method):
    """GPTQ (:func:`refquant.gptq`) with Hessians from the layer's (partially quantized) inputs."""

    name = "gptq"

    def quantize_layer(self, ctx):
        cfg = ctx.config
        steps = TRUE_SEQUENTIAL if cfg.true_sequential else (tuple(llama.LINEARS),)
        for names in steps:
            groups = {INPUT_OF[n] for n in names}
            stats = ctx.collect({g: ("H",) for g in groups})
            for group in sorted(groups):
                members = [n for n in names if INPUT_OF[n] == group]
                qws = ctx.ops.gptq_shared([ctx.get(n) for n in members], stats[group].H, cfg.weight_spec(),
                                          blocksize=cfg.blocksize, percdamp=cfg.percdamp, act_order=cfg.act_order,
                                          static_groups=cfg.static_groups, max_percdamp=cfg.max_percdamp)
                for n, qw in zip(members, qws):
                    ctx.set_quantized(n, qw)
                    ctx.info.setdefault("gptq_loss", {})[n] = float(qw.info.get("loss", float("nan")))


METHOD_MODULES = ("refquant.smoothquant", "refquant.awq", "refquant.aweq")
"""Modules whose layer-level methods register themselves; imported on the first lookup."""


class _MethodRegistry(dict):
    """``name -> Method``; the first read imports :data:`METHOD_MODULES` (no import cycle at load time)."""

    _loaded = False

    def _load(self):
        if not self._loaded:
            self._loaded = True
            import importlib

            for module in METHOD_MODULES:
                importlib.import_module(module)

    def __getitem__(self, key):
        self._load()
        return super().__getitem__(key)

    def __contains__(self, key):
        self._load()
        return super().__contains__(key)

    def __iter__(self):
        self._load()
        return super().__iter__()

    def __len__(self):
        self._load()
        return super().__len__()

    def get(self, key, default=None):
        self._load()
        return super().get(key, default)

    def keys(self):
        self._load()
        return super().keys()

    def values(self):
        self._load()
        return super().values()

    def items(self):
        self._load()
        return super().items()


METHODS: dict[str, Method] = _MethodRegistry({m.name: m() for m in (RTN, GPTQ)})


def register_method(method: Method) -> Method:
    """Add a method instance to :data:`METHODS` (the CLI and :class:`QuantConfig` see it)."""
    METHODS[method.name] = method
    return method


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class LayerRecord:
    index: int
    seconds: float
    quantized: dict[str, QuantizedWeight]
    act_quant: dict[str, ActQuant]
    info: dict


@dataclass
class QuantizationResult:
    config: QuantConfig
    layers: list[LayerRecord]
    timings: dict

    def act_quant_recipe(self) -> dict:
        """Per layer and linear, the activation quantizer (JSON-ready)."""
        return {str(r.index): {n: asdict(a) for n, a in r.act_quant.items()} for r in self.layers if r.act_quant}


def quantize_model(runner: Runner, config: QuantConfig, calib_ids: np.ndarray | None,
                   on_layer: Callable[[LayerRecord, object], None] | None = None, start_layer: int = 0,
                   replay: Callable[[int, object], None] | None = None, keep_quantized: bool = True,
                   timer: StageTimer | None = None) -> QuantizationResult:
    """Quantize every decoder layer of ``runner``'s model in order.

    Args:
        runner: the model adapter (its ``ops`` is the backend used for the algorithms).
        config: the method and its settings.
        calib_ids: calibration token windows (nsamples, seqlen); unused by RTN.
        on_layer: called with each finished layer's record and layer object (e.g. to write it to
            disk, so that a crashed run can be resumed).
        start_layer, replay: resume support -- layers ``< start_layer`` are already done;
            ``replay(i, layer)`` loads layer i's saved quantized state into ``layer`` so that the
            calibration inputs are propagated exactly as in the original run.
        keep_quantized: keep every layer's codes/scales/zeros in the result (as host NumPy
            arrays); False drops them after ``on_layer`` (long runs that write each layer to disk).
        timer: a :class:`StageTimer` to fill (the caller keeps the stage times even if the run stops).
    """
    method = METHODS[config.method]
    n_layers = runner.config.num_hidden_layers
    timer = timer or StageTimer(getattr(runner, "sync", None))
    t_start = time.perf_counter()
    acts = None
    if method.needs_calibration:
        if calib_ids is None or np.asarray(calib_ids).ndim != 2:
            raise ValueError(f"method {config.method} needs calibration windows of shape (nsamples, seqlen).")
        with timer.stage("embed"):
            acts = runner.embed(np.asarray(calib_ids))
    records = []
    for i in progress(range(n_layers), total=n_layers, desc=f"{config.method} layers"):
        t0 = time.perf_counter()
        with timer.stage("load_layer"):
            layer = runner.load_layer(i)
        if i < start_layer:  # resume: replay the saved layer to regenerate the next inputs
            with timer.stage("replay"):
                if acts is not None:
                    fp_out = runner.forward(layer, acts) if method.propagate == "fp" else None
                    replay(i, layer)
                    acts = fp_out if fp_out is not None else runner.forward(layer, acts, runner.saved_hooks(i))
                runner.finish_layer(i, layer)
            continue
        ctx = LayerContext(index=i, layer=layer, runner=runner, config=config, inputs=acts, timer=timer)
        fp_out = None
        if acts is not None and method.propagate == "fp":
            requests = method.first_statistics(ctx)
            if requests:  # statistics and the next layer's inputs from one pass through the FP layer
                stats, fp_out = ctx.collect(requests, keep_output=True)
                ctx.prefetched = (requests, stats)
            else:
                with timer.stage("propagate"):
                    fp_out = runner.forward(layer, acts)
        before = dict(timer.seconds)
        with timer.stage("quantize"):
            method.quantize_layer(ctx)
        # time spent collecting statistics inside quantize_layer is reported under its own stages
        inner = sum(timer.seconds.get(k, 0.0) - before.get(k, 0.0) for k in ("calibration_forward", "statistics"))
        timer.add("quantize", -inner)
        if acts is not None:
            with timer.stage("propagate"):
                acts = fp_out if fp_out is not None else runner.forward(layer, acts, ctx.hooks())
        record = LayerRecord(i, time.perf_counter() - t0, ctx.quantized, ctx.act_quant, ctx.info)
        with timer.stage("write_layer"):
            if on_layer is not None:
                on_layer(record, layer)
            runner.finish_layer(i, layer)
        record.quantized = {n: _on_host(qw, runner.ops) for n, qw in record.quantized.items()} if keep_quantized else {}
        records.append(record)
        log.info("layer %d/%d done in %.2fs", i + 1, n_layers, record.seconds)
    timings = dict(timer.seconds)
    timings["total"] = time.perf_counter() - t_start
    return QuantizationResult(config, records, timings)


def _on_host(qw: QuantizedWeight, ops) -> QuantizedWeight:
    """The quantized weight with its arrays moved to host memory (NumPy); GPU memory is freed."""
    to_numpy = getattr(ops, "to_numpy", np.asarray)
    info = {k: (to_numpy(v) if hasattr(v, "shape") else v) for k, v in qw.info.items()}
    return QuantizedWeight(to_numpy(qw.codes), to_numpy(qw.scale), to_numpy(qw.zero), to_numpy(qw.g_idx), qw.spec, info)


# ---------------------------------------------------------------------------------------------
# The NumPy runner (the reference model)


class NumpyRunner:
    """Runs the loop on :class:`refquant.llama.LlamaModel` with the NumPy reference ops.

    Calibration samples are run one at a time (batch 1), as the original does.
    """

    def __init__(self, model: llama.LlamaModel, ops=None):
        import backends

        self.model = model
        self.config = model.config
        self.ops = ops or backends.get_backend("numpy")
        self._rope = {}
        self.saved_act_quant: dict[int, dict[str, ActQuant]] = {}

    def in_features(self, group: str) -> int:
        return self.config.intermediate_size if group == "down_in" else (
            self.config.num_attention_heads * self.config.head_dim if group == "o_in" else self.config.hidden_size)

    def rope(self, T: int):
        if T not in self._rope:
            self._rope[T] = llama.rope_tables(self.config, T)
        return self._rope[T]

    def embed(self, ids):
        return llama.embed(self.model, ids)

    def load_layer(self, i):
        return self.model.layers[i]

    def finish_layer(self, i, layer):
        self.model.layers[i] = layer

    def forward(self, layer, acts, hooks=None, keep_output: bool = True):
        cos, sin = self.rope(acts.shape[1])
        hooks = hooks or llama.NO_HOOKS
        outs = [llama.decoder_layer(layer, acts[j:j + 1], self.config, cos, sin, hooks) for j in range(acts.shape[0])]
        return np.concatenate(outs) if keep_output else None

    def block(self, layer, kind, x, weights):
        """Output of the attention (``kind="attn"``) or MLP (``"mlp"``) of ``layer`` on its input
        ``x`` with the given weights substituted (AWQ's compared module)."""
        trial = dict(layer, **weights)
        if kind == "attn":
            cos, sin = self.rope(x.shape[1])
            return np.concatenate([llama.attention(trial, x[j:j + 1], self.config, cos, sin) for j in range(x.shape[0])])
        if kind == "mlp":
            return llama.mlp(trial, x)
        return llama.linear(trial, kind, x)

    def get(self, layer, name):
        return layer.get(name) if name.endswith(".bias") else layer[name]

    def set(self, layer, name, value):
        layer[name] = np.asarray(value, dtype=np.float64)

    def saved_hooks(self, i):
        aq = self.saved_act_quant.get(i, {})
        ctx = LayerContext(index=i, layer=None, runner=self, config=None, inputs=None, act_quant=aq)
        return ctx.hooks()
