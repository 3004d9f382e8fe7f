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
torch runner in ``refquant/torch_pipeline.py`` for Hugging Face models), and an *ops* object (a
backend from ``refquant.backends.get_backend``) supplies the array algorithms. A method is a
wiring unit in ``refquant/methods/`` (a :class:`Method` subclass with ``quantize_layer(ctx)``)
registered with :func:`register`; the loop, the CLI and the tools iterate :data:`METHODS`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, ClassVar, Protocol

import numpy as np

from . import backends, golden
from .spec import llama
from .spec.formats import WeightFormat
from .spec.progress import progress
from .spec.quantizer import QuantSpec
from .spec.stats import KINDS as STATISTICS

log = logging.getLogger("refquant")

Q, K, V, O, GATE, UP, DOWN = llama.Q, llama.K, llama.V, llama.O, llama.GATE, llama.UP, llama.DOWN
INPUT_LINEARS, INPUT_OF, NORM_OF = llama.INPUT_LINEARS, llama.INPUT_OF, llama.NORM_OF


class CalibrationOverflow(FloatingPointError):
    """Non-finite activations during calibration (fp16/bf16 overflow, NaN/Inf weights), with the
    layer and linear where they first appear."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Options:
    """Base of a method's typed options (a frozen dataclass with the authors' defaults).

    Every field becomes a CLI argument of ``refquant quantize`` (``refquant/cli.py`` generates them:
    ``--field-name``; a bool that defaults to True becomes ``--no-field-name``); a field's
    ``metadata["help"]`` is its help text. ``__post_init__`` validates the values.
    """


@dataclass(frozen=True)
class NoOptions(Options):
    """A method without options of its own."""


ACT_MODES = ("per_token", "per_tensor", "per_tensor_static")


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides a quantized model (recorded in every result).

    The fields every method shares: the weight grid (``wbits``, ``group_size``: ``None`` = per
    output channel, ``sym``) and the activation quantizers (``abits``: 16 = not quantized,
    ``act_mode``: ``per_token`` | ``per_tensor`` | ``per_tensor_static``, ``quantize_bmm_input``:
    also per-token quantize the q/k/v outputs, SmoothQuant's W8A8 recipe). ``options`` holds the
    method's own typed options (its wiring unit's ``Options`` dataclass; default: the authors'
    defaults). :meth:`of` builds a config from flat keyword arguments.
    """

    method: str = "gptq"
    wbits: int = 4
    group_size: int | None = 128
    sym: bool = False
    abits: int = 16
    act_mode: str = "per_token"
    quantize_bmm_input: bool = False
    options: Options | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; available: {sorted(METHODS)}.")
        method = METHODS[self.method]
        if self.options is None:
            object.__setattr__(self, "options", method.Options())
        if not isinstance(self.options, method.Options):
            raise ValueError(f"options of method {self.method!r} must be a {method.Options.__name__}; "
                             f"got {type(self.options).__name__}.")
        if self.abits != 16 and not 2 <= self.abits <= 8:
            raise ValueError(f"abits must be 16 (no activation quantization) or 2..8; got {self.abits}.")
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {', '.join(ACT_MODES)}; got {self.act_mode!r}.")
        method.validate(self)
        self.weight_spec()  # validates wbits/group_size

    @classmethod
    def of(cls, method: str = "gptq", **kwargs) -> "QuantConfig":
        """A config from flat keyword arguments: shared fields by name, the rest are the method's options.

        ``QuantConfig.of("awq", wbits=3, awq_search_samples=32)`` is
        ``QuantConfig("awq", wbits=3, options=AWQOptions(awq_search_samples=32))``.
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}.")
        shared = {f.name for f in fields(cls)} - {"method", "options"}
        opts_cls = METHODS[method].Options
        own = {f.name for f in fields(opts_cls)}
        unknown = set(kwargs) - shared - own
        if unknown:
            raise ValueError(f"{method}: unknown setting(s) {sorted(unknown)}; shared settings: {sorted(shared)}, "
                             f"{method} options: {sorted(own) or 'none'}.")
        options = opts_cls(**{k: v for k, v in kwargs.items() if k in own})
        return cls(method=method, options=options, **{k: v for k, v in kwargs.items() if k in shared})

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """The inverse of :meth:`to_dict`."""
        d = dict(d)
        options = d.pop("options", None) or {}
        return cls.of(d.pop("method", "gptq"), **d, **options)

    @property
    def method_obj(self) -> "Method":
        return METHODS[self.method]

    def weight_spec(self) -> QuantSpec:
        return METHODS[self.method].weight_spec(self)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Runners and ops (protocols)


class Runner(Protocol):
    """Adapts a model to the loop. Arrays are the runner's own (NumPy, or torch on a device).

    ``forward(..., keep_output=False, stop_after=name)`` may end each sequence's pass right after
    linear ``name``'s input hook (:func:`stopping_hooks`); it returns None then.
    """

    config: llama.LlamaConfig
    ops: object

    def embed(self, ids: np.ndarray): ...
    def load_layer(self, i: int): ...
    def finish_layer(self, i: int, layer) -> None: ...
    def forward(self, layer, acts, hooks: llama.LinearHooks | None = None, keep_output: bool = True,
                stop_after: str | None = None): ...
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
    """Wall time per pipeline stage; synchronizes the device (``runner.sync``) at stage edges.

    ``event``: a factory of device timing events (``record()``, ``elapsed_time(other)`` in ms, as
    ``torch.cuda.Event(enable_timing=True)``) for :meth:`part`; None: parts synchronize and read the clock.
    """

    def __init__(self, sync: Callable[[], None] | None = None, event: Callable[[], object] | None = None):
        self.sync = sync or (lambda: None)
        self.event = event
        self.seconds: dict[str, float] = {}
        self._parts: list = []

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
                timer._settle()

        return _Stage()

    def part(self, name: str, within: str):
        """Time a piece of stage ``within`` (which must enclose it) as stage ``name`` instead.

        With device events the piece is timed on the device, without synchronizing (the Hessian update
        inside every calibration batch would otherwise stall the queue twice per batch); the seconds move
        from ``within`` to ``name`` when the enclosing stage ends.
        """
        timer = self

        class _Part:
            def __enter__(self):
                if timer.event is None:
                    timer.sync()
                    self.t = time.perf_counter()
                else:
                    self.a = timer.event()
                    self.a.record()

            def __exit__(self, *exc):
                if timer.event is None:
                    timer.sync()
                    timer._parts.append((name, within, time.perf_counter() - self.t))
                else:
                    b = timer.event()
                    b.record()
                    timer._parts.append((name, within, (self.a, b)))

        return _Part()

    def _settle(self) -> None:
        for name, within, t in self._parts:
            seconds = t if isinstance(t, float) else t[0].elapsed_time(t[1]) / 1e3
            self.add(name, seconds)
            self.add(within, -seconds)
        self._parts.clear()


@dataclass
class LayerContext:
    index: int
    layer: object
    runner: Runner
    config: QuantConfig
    inputs: object
    quantized: dict[str, WeightFormat] = field(default_factory=dict)
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
        """Replace a weight, norm gain or bias of the layer; only what the method declares it touches."""
        method = self.config.method_obj
        if name not in method.touches:
            raise ValueError(f"method {method.name!r} changed {name!r}, which its wiring unit does not declare in "
                             f"Method.touches ({', '.join(method.touches)}); declare it there.")
        self.runner.set(self.layer, name, value)

    def set_quantized(self, name: str, qw: WeightFormat) -> None:
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
        method = self.config.method_obj
        undeclared = sorted({k for kinds in requests.values() for k in kinds} - set(method.statistics))
        if undeclared:
            raise ValueError(f"method {method.name!r} collects {undeclared}, which its wiring unit does not declare in "
                             f"Method.statistics ({', '.join(method.statistics) or 'none'}); declare them there.")
        if self.prefetched is not None and self.prefetched[0] == requests and not keep_output:
            stats, self.prefetched = self.prefetched[1], None
            return stats
        first = {group: INPUT_LINEARS[group][0] for group in requests}
        stats = {group: self.ops.channel_stats(kinds, self.runner.in_features(group)) for group, kinds in requests.items()}
        wanted = {name: group for group, name in first.items()}
        timer = self.timer

        def on_input(name, x):
            if name in wanted:
                with timer.part("statistics", within="calibration_forward"):
                    try:
                        stats[wanted[name]].add(x)
                    except ValueError as e:
                        if "non-finite" not in str(e):
                            raise
                        raise CalibrationOverflow(
                            f"non-finite activations at the input of model.layers.{self.index}.{name} ({e}) -- "
                            "fp16 overflows above 65504: run in bfloat16 or float32, or check the weights."
                        ) from None
            return self._act_hook(name, x)

        # without outputs the pass ends at the last input it needs (GPTQ's: down_proj's, so its GEMM is skipped)
        stop = None if keep_output else max(wanted, key=llama.LINEARS.index, default=None)
        with timer.stage("calibration_forward"):
            out = self.runner.forward(self.layer, self.inputs,
                                      llama.LinearHooks(on_input=on_input, on_output=self._out_hook),
                                      keep_output=keep_output, stop_after=stop)
        return (stats, out) if keep_output else stats

    def hooks(self) -> llama.LinearHooks:
        """The activation quantizers chosen so far (used when propagating through this layer)."""
        return act_quant_hooks(self.act_quant, self.ops)

    def _act_hook(self, name, x):
        return act_quant_hooks(self.act_quant, self.ops).on_input(name, x)

    def _out_hook(self, name, y):
        return act_quant_hooks(self.act_quant, self.ops).on_output(name, y)


def act_quant_hooks(act_quant: dict[str, ActQuant], ops) -> llama.LinearHooks:
    """Linear hooks that fake-quantize each linear's input (and, with ``quantize_output``, its output)
    as ``act_quant`` (linear name -> :class:`ActQuant`) says, with the backend ``ops``."""

    def on_input(name, x):
        aq = act_quant.get(name)
        return x if aq is None else ops.quantize_activation(x, aq.bits, aq.mode, aq.static_scale)

    def on_output(name, y):
        aq = act_quant.get(name)
        return y if aq is None or not aq.quantize_output else ops.quantize_activation(y, aq.bits, "per_token")

    return llama.LinearHooks(on_input=on_input, on_output=on_output)


# ---------------------------------------------------------------------------------------------
# Methods


class PassDone(Exception):
    """Raised by :func:`stopping_hooks` to end a statistics pass early (caught by the runner, per batch)."""


def stopping_hooks(hooks: llama.LinearHooks | None, stop_after: str | None) -> llama.LinearHooks:
    """``hooks`` that end the layer's forward right after linear ``stop_after`` has seen its input.

    For statistics passes that keep no output (``Runner.forward(..., keep_output=False)``): what
    comes after the last input a method needs is never used, so it is not computed. None: unchanged.
    """
    hooks = hooks if hooks is not None else llama.NO_HOOKS
    if stop_after is None:
        return hooks
    if stop_after not in llama.LINEARS:
        raise ValueError(f"stop_after must be one of {llama.LINEARS}; got {stop_after!r}.")

    def on_input(name, x):
        x = hooks.on_input(name, x) if hooks.on_input is not None else x
        if name == stop_after:
            raise PassDone
        return x

    return llama.LinearHooks(on_input=on_input, on_output=hooks.on_output)


class Method:
    """Base class of a method's wiring unit (``refquant/methods/<name>.py``), registered once with
    :func:`register`. The CLI, the golden tool, the benchmark, the main job and the loop read
    everything about a method from here:

    * ``name``; ``Options``: the typed options dataclass (authors' defaults; CLI arguments are
      generated from it); :meth:`validate`: checks across the shared config and the options;
    * ``ops``: the backend protocol (``refquant.backends.protocols``) the method's
      :meth:`quantize_layer` calls -- a backend without that twin is refused with a clear error;
    * ``touches``: the weights, norm gains and biases of a decoder layer the method may change
      (``LayerContext.set`` refuses others); ``statistics``: the calibration statistics it may
      collect (``H``, ``absmax``, ``mean_abs``, ``minmax``, ``mean``, ``inputs``);
    * ``needs_calibration``; ``propagate``: next-layer inputs from the ``"quantized"`` or the
      ``"fp"`` layer; :meth:`first_statistics` (what the first calibration pass collects, per
      linear input: ``H``, ``absmax``, ``mean_abs``, ``minmax``, ``mean``, ``inputs``);
    * :meth:`weight_spec`; :meth:`quantize_layer`: the method on one decoder layer;
    * ``golden``: its golden suites (``refquant.golden.GoldenSuite``: cases, comparison and parity
      rules, how to run a backend on a case); ``preflight``: the golden suites a GPU run of the
      method is checked on first;
    * ``bench_preset`` (settings for ``tools/bench.py``; ``bench_default``: run by default);
      ``suites`` and :meth:`study_rows`: the main job's suites the method has rows in, and the rows.
    """

    name: ClassVar[str] = "?"
    Options: ClassVar[type] = NoOptions
    ops: ClassVar[type] = object
    touches: ClassVar[tuple[str, ...]] = llama.LINEARS
    statistics: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = True
    propagate: ClassVar[str] = "quantized"  # or "fp": next-layer inputs from the unquantized layer
    golden: ClassVar[tuple] = ()
    preflight: ClassVar[tuple[str, ...]] = ()
    bench_preset: ClassVar[dict | None] = None
    bench_default: ClassVar[bool] = False
    suites: ClassVar[tuple[str, ...]] = ()

    def validate(self, config: QuantConfig) -> None:
        """Raise ValueError when the shared settings do not fit the method (e.g. AWQ with ``sym``)."""

    def weight_spec(self, config: QuantConfig) -> QuantSpec:
        return QuantSpec(bits=config.wbits, group_size=config.group_size, sym=config.sym)

    def quantize_layer(self, ctx: LayerContext) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement quantize_layer")

    def first_statistics(self, ctx: LayerContext) -> dict | None:
        """For ``propagate = "fp"``: the requests of the method's first :meth:`LayerContext.collect`.

        The loop then gathers them in the same pass that computes the next layer's inputs from the
        FP layer (one layer forward instead of two); the method's ``collect`` with exactly these
        requests receives them. None: no fusion.
        """
        return None

    def study_rows(self, suite: str) -> list:
        """The method's rows ``(key, label, QuantConfig)`` in the main job's ``suite`` (none by default)."""
        return []

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


METHODS: dict[str, Method] = {}
"""Every registered method by name, filled by the wiring units in ``refquant/methods/``."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator of a wiring unit: registers the method and its golden suites, once.

    Refuses a second method of the same name, options that are not a frozen :class:`Options`
    dataclass, and golden suites another method already registered.
    """
    name = cls.name
    if not isinstance(name, str) or not name or name == "?":
        raise ValueError(f"{cls.__name__}: set the class attribute name = '<method>' before registering.")
    if name in METHODS:
        raise ValueError(f"method {name!r} is registered twice ({type(METHODS[name]).__name__} and {cls.__name__}).")
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, Options)):
        raise ValueError(f"{cls.__name__}.Options must be a dataclass subclassing refquant.pipeline.Options.")
    unknown = set(cls.statistics) - set(STATISTICS)
    if unknown:
        raise ValueError(f"{cls.__name__}.statistics has unknown kind(s) {sorted(unknown)}; known: {STATISTICS}.")
    if cls.propagate not in ("quantized", "fp"):
        raise ValueError(f"{cls.__name__}.propagate must be 'quantized' or 'fp'; got {cls.propagate!r}.")
    for suite in cls.golden:
        golden.register_suite(suite)
    METHODS[name] = cls()
    return cls


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class LayerRecord:
    index: int
    seconds: float
    quantized: dict[str, WeightFormat]
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
    if not isinstance(runner.ops, method.ops):
        raise ValueError(f"method {config.method!r} needs the {method.ops.__name__} operations, which the "
                         f"{getattr(runner.ops, 'name', type(runner.ops).__name__)!r} backend does not implement; "
                         f"use a backend that has {config.method}'s twin (see docs/architecture.md).")
    n_layers = runner.config.num_hidden_layers
    timer = timer or StageTimer(getattr(runner, "sync", None), getattr(runner, "timing_event", None))
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
                else:  # no calibration (RTN, DB-LLM's FDB): the saved layer still replaces the FP one
                    replay(i, layer)
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


def _on_host(qw: WeightFormat, ops) -> WeightFormat:
    """The quantized weight (any format) with its arrays moved to host memory (NumPy); GPU memory is freed."""
    def host(v):
        return ops.to_numpy(v) if hasattr(v, "shape") else v

    moved = {f.name: host(getattr(qw, f.name)) for f in fields(qw) if f.name != "info"}
    return replace(qw, **moved, info={k: host(v) for k, v in qw.info.items()})


# ---------------------------------------------------------------------------------------------
# The NumPy runner (the reference model)


class NumpyRunner:
    """Runs the loop on :class:`refquant.llama.LlamaModel` with the NumPy reference ops.

    Calibration samples are run one at a time (batch 1), as the original does.
    """

    def __init__(self, model: llama.LlamaModel, ops=None):
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

    def forward(self, layer, acts, hooks=None, keep_output: bool = True, stop_after: str | None = None):
        cos, sin = self.rope(acts.shape[1])
        hooks = hooks or llama.NO_HOOKS
        if keep_output:
            return np.concatenate([llama.decoder_layer(layer, acts[j:j + 1], self.config, cos, sin, hooks)
                                   for j in range(acts.shape[0])])
        hooks = stopping_hooks(hooks, stop_after)
        for j in range(acts.shape[0]):
            try:
                llama.decoder_layer(layer, acts[j:j + 1], self.config, cos, sin, hooks)
            except PassDone:
                pass
        return None

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
        return act_quant_hooks(self.saved_act_quant.get(i, {}), self.ops)
