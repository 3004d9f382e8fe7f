"""Full-model runs: load a model, calibrate, quantize layer by layer, save, evaluate perplexity.

Shared by the CLI (``refquant quantize``, ``refquant eval``, ``refquant main``) and the tests. Two
backends run the same loop (:mod:`refquant.pipeline`):

* ``numpy``: the NumPy reference LLaMA (float64) and the reference algorithms -- the spec;
* ``torch``: a transformers ``LlamaForCausalLM`` on CPU or one GPU (``refquant/torch_pipeline.py``).

Output directory of a quantization (every file written to a temporary name, then renamed):

* ``config.json``, ``model.safetensors`` (+ tokenizer files): the dequantized model, loadable by
  transformers;
* ``quantized/layer_XXX.safetensors`` + ``.json``: per layer the integer codes, scales, zeros and
  group maps of every linear, its norms and biases, activation quantizers and diagnostics -- written
  as each layer finishes, so ``--resume`` continues a crashed run with identical results;
* ``refquant.json``: the recipe (config, activation quantizers) that ``refquant eval`` re-applies;
* ``results.json``: provenance, config, data variants, timings, per-layer info, perplexities.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import backends, data, pipeline
from .spec import formats, llama, safetensors_io
from .spec.perplexity import PerplexityResult, cross_entropy, perplexity
from .provenance import ROOT, portable_path, provenance, write_json_atomic

log = logging.getLogger("refquant")

DEFAULT_MODEL = ROOT / "golden" / "models" / "tiny-llama3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


try:  # the torch path is optional: the numpy backend runs without torch and transformers
    from . import torch_pipeline
except ImportError:
    torch_pipeline = None


def _torch_pipeline():
    if torch_pipeline is None:
        raise ImportError("the torch backend needs torch and transformers: pip install -e '.[torch]'.")
    return torch_pipeline


def torch_available() -> bool:
    """torch and transformers are importable (``refquant.torch_pipeline`` loaded)."""
    return torch_pipeline is not None and importlib.util.find_spec("transformers") is not None


def resolve_backend(name: str = "auto") -> str:
    if name == "auto":
        return "torch" if torch_available() else "numpy"
    if name not in ("numpy", "torch"):
        raise ValueError(f"backend must be numpy, torch or auto for full-model runs; got {name!r}.")
    if name == "torch" and not torch_available():
        raise ImportError("backend 'torch' needs torch and transformers: pip install -e '.[torch]'.")
    return name


def resolve_device(backend: str, device: str | None) -> str:
    if backend == "numpy":
        if device not in (None, "auto", "cpu"):
            raise ValueError(f"the numpy backend runs on the CPU; got --device {device}.")
        return "cpu"
    if device in (None, "auto"):
        return "cuda" if _torch_pipeline().torch.cuda.is_available() else "cpu"
    return device


@dataclass
class LoadedModel:
    """A model ready for the loop: the backend's model object, its tokenizer and where it came from."""

    backend: str
    model: object
    encode: object
    source: str
    device: str
    dtype: str
    config_json: dict = field(default_factory=dict)
    act_quant: dict = field(default_factory=dict)  # {layer: {linear: ActQuant}} of a quantized model

    def runner(self, batch_size: int = 8):
        if self.backend == "numpy":
            return pipeline.NumpyRunner(self.model)
        return _torch_pipeline().HFRunner(self.model, device=self.device, batch_size=batch_size)


def encoder_for(model_dir: str):
    """The model's tokenizer as ``text -> ids`` (transformers AutoTokenizer, else ``tokenizers``)."""
    try:
        from transformers import AutoTokenizer

        return data.as_encoder(AutoTokenizer.from_pretrained(model_dir))
    except ImportError:
        from tokenizers import Tokenizer

        return data.as_encoder(Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")))


def load(model: str | os.PathLike = DEFAULT_MODEL, backend: str = "auto", device: str | None = None,
         dtype: str = "float32") -> LoadedModel:
    """Load a LLaMA checkpoint for ``backend`` (``numpy``: float64 always; ``torch``: ``dtype``)."""
    backend = resolve_backend(backend)
    device = resolve_device(backend, device)
    path = Path(model)
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    recipe = {}
    if (path / "refquant.json").exists():
        recipe = act_quant_from_json(json.loads((path / "refquant.json").read_text()).get("act_quant", {}))
    if backend == "numpy":
        if not path.is_dir():
            raise FileNotFoundError(f"the numpy backend reads local checkpoints; {model!r} is not a directory.")
        return LoadedModel("numpy", llama.load(path), encoder_for(str(path)), str(path), "cpu", "float64", cfg, recipe)
    torch = _torch_pipeline().torch
    torch_dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    hf = _torch_pipeline().load_model(str(model), dtype=torch_dtype, device="cpu")
    if not cfg:
        cfg = hf.config.to_dict()
    return LoadedModel("torch", hf, encoder_for(str(model)), str(model), device, dtype, cfg, recipe)


# ---------------------------------------------------------------------------------------------
# Quantization with per-layer checkpoints


def act_quant_to_json(recipe: dict) -> dict:
    from dataclasses import asdict

    return {str(i): {n: asdict(a) for n, a in aq.items()} for i, aq in recipe.items()}


def act_quant_from_json(obj: dict) -> dict:
    return {int(i): {n: pipeline.ActQuant(**a) for n, a in aq.items()} for i, aq in obj.items()}


class LayerStore:
    """``out/quantized/layer_XXX.{safetensors,json}``: the per-layer results, written as they finish."""

    def __init__(self, out_dir: Path, ops):
        self.dir = Path(out_dir) / "quantized"
        self.ops = ops

    def run_file(self) -> Path:
        return self.dir / "run.json"

    def write(self, record: pipeline.LayerRecord, layer, runner) -> None:
        tensors, weight_formats = {}, {}
        for name, qw in record.quantized.items():  # the weight formats' one serializer
            parts, weight_formats[name] = qw.to_tensors()
            tensors.update({f"{name}.{k}": v for k, v in parts.items()})
        for name in llama.NORMS:
            tensors[name] = self.ops.to_numpy(runner.get(layer, name))
        for name in llama.LINEARS:
            bias = runner.get(layer, name + ".bias")
            if bias is not None:
                tensors[name + ".bias"] = self.ops.to_numpy(bias)
            if name not in record.quantized:  # e.g. a method that changes a weight without quantizing it
                tensors[name] = self.ops.to_numpy(runner.get(layer, name))
        meta = {"index": record.index, "seconds": record.seconds, "info": record.info,
                "act_quant": act_quant_to_json({record.index: record.act_quant}).get(str(record.index), {}),
                "formats": weight_formats}
        self.dir.mkdir(parents=True, exist_ok=True)
        safetensors_io.write(self.dir / f"layer_{record.index:03d}.safetensors", tensors)
        write_json_atomic(self.dir / f"layer_{record.index:03d}.json", meta)

    def done_layers(self) -> int:
        k = 0
        while (self.dir / f"layer_{k:03d}.json").exists() and (self.dir / f"layer_{k:03d}.safetensors").exists():
            k += 1
        return k

    def replay(self, i: int, layer, runner) -> None:
        """Load layer i's saved quantized state into ``layer`` (dequantized exactly as in the run)."""
        t = safetensors_io.read(self.dir / f"layer_{i:03d}.safetensors")
        meta = json.loads((self.dir / f"layer_{i:03d}.json").read_text())
        for name in llama.NORMS:
            runner.set(layer, name, runner.ops.like(t[name], runner.get(layer, name)))
        for name in llama.LINEARS:
            if name in meta["formats"]:
                ref = runner.get(layer, name)
                prefix = name + "."
                fmt = formats.from_tensors({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)},
                                           meta["formats"][name])
                on_device = {f.name: _like_int(runner, getattr(fmt, f.name), ref) for f in dataclasses.fields(fmt)
                             if isinstance(getattr(fmt, f.name), np.ndarray)}  # dtypes kept: dequantized as in the run
                runner.set(layer, name, dataclasses.replace(fmt, **on_device).dequantize())
            elif name in t:
                runner.set(layer, name, runner.ops.like(t[name], runner.get(layer, name)))
            if f"{name}.bias" in t:
                runner.set(layer, name + ".bias", runner.ops.like(t[f"{name}.bias"], runner.get(layer, name)))
        runner.saved_act_quant[i] = act_quant_from_json({i: meta["act_quant"]}).get(i, {})

    def records(self, n_layers: int) -> list[dict]:
        return [json.loads((self.dir / f"layer_{i:03d}.json").read_text()) for i in range(n_layers)]


def _like_int(runner, a, ref):
    """``a`` as an array of the runner's backend on ``ref``'s device, with ``a``'s dtype."""
    if runner.ops.name == "numpy":
        return np.asarray(a)
    return _torch_pipeline().torch.as_tensor(np.asarray(a), device=ref.device)


def quantize(loaded: LoadedModel, config: pipeline.QuantConfig, calib_ids: np.ndarray | None,
             out_dir: str | os.PathLike | None = None, resume: bool = False, run_info: dict | None = None,
             batch_size: int = 8) -> pipeline.QuantizationResult:
    """Quantize ``loaded`` in place; with ``out_dir``, every finished layer is written immediately."""
    runner = loaded.runner(batch_size)
    start, on_layer, replay = 0, None, None
    if out_dir is not None:
        store = LayerStore(Path(out_dir), runner.ops)
        signature = {"config": config.to_dict(), "model": portable_path(loaded.source), "backend": loaded.backend,
                     "dtype": loaded.dtype, "calibration": run_info or {}}
        if store.run_file().exists():
            previous = json.loads(store.run_file().read_text())
            if not resume:
                raise FileExistsError(f"{store.dir} holds a partial or finished run; pass --resume to continue it "
                                      "or choose another --out.")
            if previous != json.loads(json.dumps(signature, default=str)):
                raise ValueError(f"--resume: the run in {store.dir} was made with different settings:\n"
                                 f"  saved: {previous}\n  now:   {signature}")
            start = store.done_layers()
            log.info("resuming after %d finished layer(s)", start)
        else:
            write_json_atomic(store.run_file(), signature)
        on_layer = lambda record, layer: store.write(record, layer, runner)  # noqa: E731
        replay = lambda i, layer: store.replay(i, layer, runner)  # noqa: E731
    result = pipeline.quantize_model(runner, config, calib_ids, on_layer=on_layer, start_layer=start, replay=replay,
                                     keep_quantized=out_dir is None)  # with out_dir the codes live on disk
    loaded.act_quant = {r.index: r.act_quant for r in result.layers if r.act_quant}
    if start and out_dir is not None:  # the resumed layers' activation quantizers come from disk
        loaded.act_quant.update({i: aq for i, aq in runner.saved_act_quant.items() if aq})
    return result


def save_model(loaded: LoadedModel, out_dir: str | os.PathLike, recipe: dict) -> None:
    """The dequantized model (transformers-loadable), tokenizer files and the recipe."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if loaded.backend == "numpy":
        llama.save(loaded.model, out_dir, {k: v for k, v in loaded.config_json.items() if k not in ("torch_dtype", "dtype")})
    else:
        tmp = out_dir / ".save.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
        tmp.rmdir()
    src = Path(loaded.source)
    for name in TOKENIZER_FILES:
        if (src / name).exists() and not (out_dir / name).exists():
            shutil.copy(src / name, out_dir / name)
    write_json_atomic(out_dir / "refquant.json", recipe)


# ---------------------------------------------------------------------------------------------
# Evaluation


def window_loss_numpy(model: llama.LlamaModel, act_quant: dict):
    ops = backends.get_backend("numpy")

    def hooks(i):
        aq = act_quant.get(i)
        return pipeline.act_quant_hooks(aq, ops) if aq else llama.NO_HOOKS

    return lambda w: cross_entropy(llama.forward(model, w[None], hooks)[0][:-1], w[1:])


def evaluate_ppl(loaded: LoadedModel, datasets: list[str], seqlen: int = 2048, data_dir=None,
                 max_windows: int | None = None, batch_size: int = 4, stream: bool = False,
                 token_cache: dict | None = None) -> dict:
    """Perplexity on each dataset with the GPTQ-lineage protocol; returns ``{name: {...}}``.

    ``token_cache`` (name -> (tokens, info)) avoids re-tokenizing when several models are evaluated.
    """
    out = {}
    token_cache = {} if token_cache is None else token_cache
    for name in datasets:
        t = time.perf_counter()
        if name not in token_cache:
            token_cache[name] = data.get_eval_tokens(name, loaded.encode, seqlen=seqlen, data_dir=data_dir)
        tokens, info = token_cache[name]
        if loaded.backend == "numpy":
            res: PerplexityResult = perplexity(window_loss_numpy(loaded.model, loaded.act_quant), tokens, seqlen,
                                               max_windows=max_windows, desc=f"ppl {name}")
        else:
            res = _torch_pipeline().perplexity(loaded.model, tokens, seqlen, device=loaded.device, batch_size=batch_size,
                            max_windows=max_windows, stream=stream, act_quant=loaded.act_quant, desc=f"ppl {name}")
        out[name] = {"ppl": res.ppl, "n_windows": res.n_windows, "seqlen": seqlen, "data": info,
                     "seconds": time.perf_counter() - t, "tokens": int(res.n_windows * seqlen)}
        log.info("%s perplexity %.4f (%d windows)", name, res.ppl, res.n_windows)
    return out


def results_record(loaded: LoadedModel, config: pipeline.QuantConfig | None, result: pipeline.QuantizationResult | None,
                   calib_info: dict | None, ppl: dict | None, timings: dict) -> dict:
    return {
        "provenance": provenance(loaded.device),
        "model": portable_path(loaded.source),
        "backend": loaded.backend,
        "dtype": loaded.dtype,
        "config": config.to_dict() if config else None,
        "calibration": calib_info,
        "timings_s": timings,
        "layers": [{"index": r.index, "seconds": r.seconds, "info": r.info} for r in result.layers] if result else [],
        "perplexity": ppl or {},
    }
