"""``refquant export``: real quantized checkpoints out of a ``refquant quantize`` run (docs/export.md).

    refquant export --run DIR --format gptq|compressed-tensors|nf4|refquant --out OUT

A run directory (:mod:`refquant.runs`) holds the dequantized model (``model*.safetensors``, the
non-quantized tensors are taken from it) and ``quantized/layer_XXX.{safetensors,json}``: per layer the
weight-format objects of every quantized linear (``meta["formats"]``). This module writes them as

* ``gptq`` -- the AutoGPTQ / GPTQModel checkpoint (``checkpoint_format`` ``gptq``, the v1 convention,
  or ``gptq_v2``): ``qweight`` int32 packed along the input dimension, ``qzeros`` int32 packed along
  the output dimension (v1: ``zero - 1``), ``scales`` float16 (n_groups, out), ``g_idx`` int32, and
  ``quantization_config`` (``quant_method: gptq``). Packing: the little-endian bit stream of
  AutoGPTQ ``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py`` ``QuantLinear.pack`` (2/4/8 bits:
  ``32 / bits`` codes per word, the first in the low bits; 3 bits: 32 codes in 3 words, codes
  straddling word boundaries -- the same bit stream), read back by GPTQModel
  ``gptqmodel/nn_modules/qlinear/__init__.py`` ``dequantize_weight``.
* ``compressed-tensors`` -- ``pack-quantized`` built by the ``compressed_tensors`` library's own
  ``PackedQuantizationCompressor`` and ``QuantizationConfig`` (what llm-compressor writes, vLLM's
  native path); 4 and 8 bits only (vLLM's WNA16 kernels), no ``g_idx`` (removed in 0.20).
* ``nf4`` -- transformers' bitsandbytes 4-bit serialization (``Params4bit`` + ``QuantState.as_dict
  (packed=True)`` of bitsandbytes ``bitsandbytes/nn/modules.py`` / ``bitsandbytes/functional.py``)
  for the ``nf4`` method's :class:`~refquant.spec.normalfloat.NF4Weight`.
* ``refquant`` -- every registered weight format (:data:`refquant.spec.formats.FORMATS`): each
  module's ``to_tensors()`` in ``quantized.safetensors``, ``refquant_index.json`` naming its format
  class and meta, the other tensors in ``model.safetensors``; :func:`load_refquant` reads it back.

A format that cannot hold the run's weights is refused with :class:`ExportError` saying why and what
to use instead (docs/export.md lists the cases).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import runs
from .provenance import portable_path, provenance, write_json_atomic
from .spec import formats, llama
from .spec.normalfloat import DYNAMIC_MAP, NF4_CODE, NF4Weight
from .spec.progress import progress

try:  # the checkpoints are torch tensors (bfloat16 included); torch is the application layer's dependency
    import torch
    from safetensors.torch import load_file as _st_load, save_file as _st_save
except ImportError:  # pragma: no cover - refquant without torch: export is unavailable, the rest works
    torch = None

try:  # compressed-tensors (pip install compressed-tensors): only the compressed-tensors export needs it
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors import __version__ as CT_VERSION
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
except ImportError:
    PackedQuantizationCompressor = CT_VERSION = None

try:  # load_refquant(model=True) builds a transformers LlamaForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:  # pragma: no cover
    LlamaForCausalLM = None

FORMAT_NAMES = ("gptq", "compressed-tensors", "nf4", "refquant")
GPTQ_BITS = (2, 3, 4, 8)
CT_BITS = (4, 8)  # vLLM CompressedTensorsWNA16: WNA16_SUPPORTED_BITS
INDEX_FILE = "refquant_index.json"
QUANTIZED_FILE = "quantized.safetensors"
INDEX_VERSION = 1


class ExportError(ValueError):
    """The run cannot be written in the requested format (the message says why and what to do)."""


def _need_torch():
    if torch is None:
        raise ImportError("refquant export needs torch and safetensors: pip install -e '.[torch]'.")


# ---------------------------------------------------------------------------------------------
# Reading a run


@dataclass
class Run:
    """A finished ``refquant quantize`` run: its config, the non-quantized tensors and every quantized module."""

    dir: Path
    config: dict  # the model's config.json
    recipe: dict  # refquant.json
    tensors: dict  # HF name -> torch tensor: the dequantized model as saved
    modules: dict = field(default_factory=dict)  # "model.layers.i.<linear>" -> WeightFormat

    @property
    def dtype(self):
        return self.tensors["model.embed_tokens.weight"].dtype


def read_run(run_dir: str | os.PathLike) -> Run:
    """Load a run directory: ``config.json``, ``refquant.json``, ``model*.safetensors`` and ``quantized/``."""
    _need_torch()
    d = Path(run_dir)
    if not (d / "config.json").exists() or not (d / "quantized").is_dir():
        raise ExportError(f"{d} is not a finished `refquant quantize` run (it needs config.json and quantized/); "
                          "run `refquant quantize --out DIR` first.")
    config = json.loads((d / "config.json").read_text())
    recipe = json.loads((d / "refquant.json").read_text()) if (d / "refquant.json").exists() else {}
    files = sorted(d.glob("model*.safetensors"))
    if not files:
        raise ExportError(f"{d} has no model*.safetensors (the dequantized model that runs.save_model writes).")
    tensors = {}
    for f in files:
        tensors.update(_st_load(str(f)))
    n_layers = int(config["num_hidden_layers"])
    store = runs.LayerStore(d, None)
    done = store.done_layers()
    if done < n_layers:
        raise ExportError(f"{d}: only {done} of {n_layers} layers are quantized (a crashed run?); finish it with "
                          "`refquant quantize ... --resume` first.")
    run = Run(d, config, recipe, tensors)
    for i in range(n_layers):
        t = _st_load(str(store.dir / f"layer_{i:03d}.safetensors"))
        meta = json.loads((store.dir / f"layer_{i:03d}.json").read_text())
        for name, fmeta in meta["formats"].items():
            prefix = name + "."
            parts = {k[len(prefix):]: v.numpy() for k, v in t.items() if k.startswith(prefix)}
            run.modules[f"model.layers.{i}.{name}"] = formats.from_tensors(parts, fmeta)
    return run


def _act_quant(run: Run) -> bool:
    aq = run.recipe.get("act_quant") or {}
    return any(bool(v) for v in aq.values())


def _other_tensors(run: Run) -> dict:
    """The tensors that no quantized module replaces (embeddings, norms, lm_head, unquantized linears)."""
    return {k: v.contiguous() for k, v in run.tensors.items() if k[: -len(".weight")] not in run.modules
            or not k.endswith(".weight")}


def _check_weight_only(run: Run, fmt: str) -> None:
    if _act_quant(run):
        raise ExportError(f"the run quantizes activations ({run.recipe.get('config', {}).get('method')}, abits < 16); "
                          f"--format {fmt} is a weight-only format and would silently drop that. Use --format refquant "
                          "(the recipe travels in refquant.json) or export a weight-only run.")


def _check_all_of(run: Run, cls, fmt: str, hint: str) -> None:
    wrong = {n: type(w).__name__ for n, w in run.modules.items() if type(w) is not cls}
    if wrong:
        first = next(iter(wrong.items()))
        raise ExportError(f"--format {fmt} holds {cls.__name__} weights only; {len(wrong)} module(s) are not "
                          f"(e.g. {first[0]}: {first[1]}). {hint}")
    n_layers = int(run.config["num_hidden_layers"])
    missing = [f"model.layers.{i}.{n}" for i in range(n_layers) for n in llama.LINEARS
               if f"model.layers.{i}.{n}" not in run.modules]
    if missing:
        raise ExportError(f"--format {fmt}: {len(missing)} linear(s) were left unquantized by the run (e.g. "
                          f"{missing[0]}); this format quantizes every linear of every layer. Use --format refquant.")


def _write_common(run: Run, out: Path, tensors: dict, quantization_config: dict | None, extra: dict) -> None:
    """model.safetensors, config.json (+ quantization_config), tokenizer files, refquant_export.json."""
    out.mkdir(parents=True, exist_ok=True)
    _st_save(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(run.config)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    write_json_atomic(out / "config.json", config)
    for name in runs.TOKENIZER_FILES + ("refquant.json",):
        if (run.dir / name).exists():
            shutil.copy(run.dir / name, out / name)
    write_json_atomic(out / "refquant_export.json", {"run": portable_path(run.dir), "provenance": provenance(),
                                                    **extra})


def _affine_arrays(w: formats.AffineWeight, fmt: str):
    """codes (int64), zero (int64) and scale (float64) of an affine weight, checked to be integral."""
    codes = np.asarray(w.codes).astype(np.int64)
    zero_f = np.asarray(w.zero, dtype=np.float64)
    zero = np.rint(zero_f).astype(np.int64)
    if not np.array_equal(zero, zero_f):
        raise ExportError(f"--format {fmt}: the zero points are not integers (rule {w.spec.rule}); integer-zero "
                          "formats cannot hold them. Use --format refquant.")
    return codes, zero, np.asarray(w.scale, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# GPTQ


def pack_bits(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Pack unsigned ``bits``-wide codes along ``axis`` into int32 words: AutoGPTQ's layout.

    Code ``k`` of a run of 32 along ``axis`` occupies bits ``bits*k .. bits*k + bits - 1`` of the
    little-endian concatenation of ``bits`` consecutive words (2/4/8 bits: ``32 / bits`` whole codes
    per word; 3 bits: codes 10 and 21 straddle words, as ``QuantLinear.pack``'s 3-bit branch writes).
    ``values.shape[axis]`` must be a multiple of 32.
    """
    v = np.moveaxis(np.asarray(values, dtype=np.uint64), axis, 0)
    n = v.shape[0]
    if n % 32:
        raise ExportError(f"GPTQ packing needs a multiple of 32 codes along the packed axis; got {n}.")
    if v.size and int(v.max()) >= 1 << bits:
        raise ExportError(f"GPTQ packing: a code exceeds {bits} bits.")
    rest = v.shape[1:]
    bitplanes = (v.reshape(n // 32, 32, -1)[:, :, None, :] >> np.arange(bits, dtype=np.uint64)[None, None, :, None]) & 1
    stream = bitplanes.reshape(n // 32, bits, 32, -1)  # (run, word, bit-in-word, column): global bit = 32 word + bit
    words = (stream << np.arange(32, dtype=np.uint64)[None, None, :, None]).sum(axis=2)
    packed = words.astype(np.uint32).reshape((n // 32) * bits, *rest).view(np.int32)
    return np.ascontiguousarray(np.moveaxis(packed, 0, axis))


def unpack_bits(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` (int64 codes)."""
    p = np.moveaxis(np.asarray(packed).view(np.uint32).astype(np.uint64), axis, 0)
    rest = p.shape[1:]
    words = p.reshape(p.shape[0] // bits, bits, -1)
    stream = (words[:, :, None, :] >> np.arange(32, dtype=np.uint64)[None, None, :, None]) & 1
    planes = stream.reshape(words.shape[0], 32, bits, -1)
    codes = (planes << np.arange(bits, dtype=np.uint64)[None, None, :, None]).sum(axis=2)
    return np.ascontiguousarray(np.moveaxis(codes.reshape(words.shape[0] * 32, *rest).astype(np.int64), 0, axis))


def gptq_tensors(w: formats.AffineWeight, checkpoint_format: str = "gptq") -> dict:
    """``qweight``, ``qzeros``, ``scales`` (float16), ``g_idx`` of one linear, AutoGPTQ/GPTQModel layout."""
    bits = w.bits
    if bits not in GPTQ_BITS:
        raise ExportError(f"--format gptq packs 2, 3, 4 or 8 bits; this weight has {bits}. Use --format refquant.")
    out_f, in_f = w.shape
    if in_f % 32 or out_f % 32:
        raise ExportError(f"--format gptq packs 32 codes at a time; shape {w.shape} is not a multiple of 32.")
    codes, zero, scale = _affine_arrays(w, "gptq")
    if checkpoint_format == "gptq":
        if (zero == 0).any():
            raise ExportError("--format gptq (checkpoint_format 'gptq', v1) stores zero - 1, so a zero point of 0 "
                              "(a group with no negative weight) does not survive; export with --checkpoint-format "
                              "gptq_v2 (GPTQModel reads it) or use --format refquant.")
        stored_zero = zero - 1
    elif checkpoint_format == "gptq_v2":
        stored_zero = zero
    else:
        raise ExportError(f"--checkpoint-format must be gptq or gptq_v2; got {checkpoint_format!r}.")
    return {
        "qweight": torch.from_numpy(pack_bits(codes.T, bits, axis=0)),  # (in_f * bits / 32, out_f)
        "qzeros": torch.from_numpy(pack_bits(stored_zero.T, bits, axis=1)),  # (n_groups, out_f * bits / 32)
        "scales": torch.from_numpy(np.ascontiguousarray(scale.T)).to(torch.float16),  # (n_groups, out_f)
        "g_idx": torch.from_numpy(np.asarray(w.g_idx).astype(np.int32)),
    }


def export_gptq(run: Run, out: Path, checkpoint_format: str = "gptq") -> dict:
    _check_weight_only(run, "gptq")
    _check_all_of(run, formats.AffineWeight, "gptq", "GPTQ holds integer codes with a scale and zero per group; "
                  "binary, codebook, mixed and rotated formats go to --format refquant (NF4: --format nf4).")
    specs = {(w.bits, w.spec.group_size, w.spec.sym) for w in run.modules.values()}
    if len(specs) != 1:
        raise ExportError(f"--format gptq has one bits/group_size/sym for the whole model; the run has {sorted(specs, key=str)}.")
    bits, group_size, sym = specs.pop()
    desc_act = any(not w.trivial_g_idx for w in run.modules.values())
    tensors = _other_tensors(run)
    for name, w in progress(list(run.modules.items()), desc="gptq pack"):
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in gptq_tensors(w, checkpoint_format).items()})
    options = (run.recipe.get("config") or {}).get("options") or {}
    qc = {"quant_method": "gptq", "bits": bits, "group_size": -1 if group_size is None else group_size,
          "desc_act": desc_act,  # from the g_idx the checkpoint holds (act-order with static groups keeps j // g)
          "sym": bool(sym), "static_groups": bool(options.get("static_groups", False)),
          "true_sequential": bool(options.get("true_sequential", False)),
          "damp_percent": options.get("percdamp", 0.01),
          "checkpoint_format": checkpoint_format, "pack_dtype": "int32", "lm_head": False,
          "meta": {"quantizer": ["refquant"]}}
    _write_common(run, out, tensors, qc, {"format": "gptq", "checkpoint_format": checkpoint_format})
    return qc


# ---------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized


def _ct_args(w: formats.AffineWeight, scale_dtype) -> "QuantizationArgs":
    sym = bool(w.spec.sym and w.spec.rule == "gptq")  # zero fixed at 2**(bits-1): CT's symmetric zero point 0
    if w.spec.group_size is None:
        return QuantizationArgs(num_bits=w.bits, type="int", symmetric=sym, strategy="channel", scale_dtype=scale_dtype)
    return QuantizationArgs(num_bits=w.bits, type="int", symmetric=sym, strategy="group", group_size=w.spec.group_size,
                            scale_dtype=scale_dtype)


def ct_module_tensors(w: formats.AffineWeight, scheme, scale_dtype) -> dict:
    """One linear through ``PackedQuantizationCompressor.compress``: the codes enter as the weight
    ``scale * (codes - zero)`` with CT's signed zero point ``zero - 2**(bits-1)``, and the library
    re-quantizes (exactly: ``w / scale`` is an integer to float rounding) and packs them."""
    codes, zero, scale = _affine_arrays(w, "compressed-tensors")
    half = 1 << (w.bits - 1)
    s = torch.from_numpy(scale).to(scale_dtype)
    zp = torch.from_numpy(zero - half).to(torch.int8)
    diff = torch.from_numpy(codes - np.repeat(zero, codes.shape[1] // zero.shape[1], axis=1)).to(torch.float32)
    weight = diff * s.to(torch.float32).repeat_interleave(codes.shape[1] // zero.shape[1], dim=1)
    state = {"weight": weight, "weight_scale": s, "weight_zero_point": zp}
    return dict(PackedQuantizationCompressor.compress(state, scheme))


def export_compressed_tensors(run: Run, out: Path, scale_dtype: str = "float16") -> dict:
    if PackedQuantizationCompressor is None:
        raise ImportError("--format compressed-tensors needs the compressed-tensors library: pip install compressed-tensors.")
    _check_weight_only(run, "compressed-tensors")
    _check_all_of(run, formats.AffineWeight, "compressed-tensors",
                  "pack-quantized holds integer codes with a scale (and zero) per group; use --format refquant.")
    dtype = getattr(torch, scale_dtype)
    for name, w in run.modules.items():
        if w.bits not in CT_BITS:
            raise ExportError(f"--format compressed-tensors: {name} has {w.bits}-bit codes; vLLM's pack-quantized "
                              f"kernels (WNA16) take {CT_BITS} bits only. Use --format gptq (2/3/4/8) or refquant.")
        if not w.trivial_g_idx:
            raise ExportError(f"--format compressed-tensors: {name} has an act-order g_idx; compressed-tensors "
                              "0.20 removed actorder='group' (g_idx). Use --format gptq (desc_act) or refquant, "
                              "or quantize without --act-order / with static groups.")
        if w.shape[1] % (w.spec.group_size or 1):
            raise ExportError(f"--format compressed-tensors: {name}: in_features {w.shape[1]} is not a multiple of "
                              f"group_size {w.spec.group_size}.")
    groups, tensors = {}, _other_tensors(run)
    for name, w in progress(list(run.modules.items()), desc="compressed-tensors pack"):
        args = _ct_args(w, dtype)
        key = json.dumps(args.model_dump(mode="json"), sort_keys=True)
        if key not in groups:
            groups[key] = (f"group_{len(groups)}", args, [])
        groups[key][2].append(name)
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in ct_module_tensors(w, scheme, dtype).items()})
    config_groups = {gname: QuantizationScheme(targets=sorted(names) if len(groups) > 1 else ["Linear"], weights=args)
                     for gname, args, names in groups.values()}
    qconfig = QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed",
                                 ignore=["lm_head"])
    qc = {"quant_method": "compressed-tensors", "version": CT_VERSION, "sparsity_config": {},
          "transform_config": {}, **qconfig.model_dump(mode="json", exclude=["quant_method"])}
    _write_common(run, out, tensors, qc, {"format": "compressed-tensors"})
    return qc


# ---------------------------------------------------------------------------------------------
# bitsandbytes NF4


def bnb_tensors(w: NF4Weight, dtype: str) -> dict:
    """The keys ``Params4bit`` / ``QuantState.as_dict(packed=True)`` write under ``<module>.weight``."""
    packed = w.packed()
    t = {"weight": torch.from_numpy(packed.reshape(-1, 1).copy()),
         "weight.quant_map": torch.from_numpy(np.array(NF4_CODE, dtype=np.float32))}
    state = {"quant_type": "nf4", "blocksize": int(w.blocksize), "dtype": dtype, "shape": [int(s) for s in w.shape]}
    if w.double_quant:
        t["weight.absmax"] = torch.from_numpy(np.asarray(w.absmax_codes, dtype=np.uint8).copy())
        t["weight.nested_absmax"] = torch.from_numpy(np.asarray(w.absmax2, dtype=np.float32).copy())
        t["weight.nested_quant_map"] = torch.from_numpy(np.array(DYNAMIC_MAP, dtype=np.float32))
        state.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": float(w.offset)})
    else:
        t["weight.absmax"] = torch.from_numpy(np.asarray(w.absmax, dtype=np.float32).copy())
    # bitsandbytes pack_dict_to_tensor: the JSON of the non-tensor entries as a uint8 tensor
    t["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    return t


def export_nf4(run: Run, out: Path) -> dict:
    _check_weight_only(run, "nf4")
    _check_all_of(run, NF4Weight, "nf4", "bitsandbytes 4-bit holds plain NF4 blocks (the nf4 method); ICQ's "
                  "per-block tau shift and every other format go to --format refquant.")
    dq = {w.double_quant for w in run.modules.values()}
    bs = {int(w.blocksize) for w in run.modules.values()}
    if len(dq) != 1 or bs != {64}:
        raise ExportError(f"--format nf4: transformers' bnb_4bit config has one double-quant setting and blocksize 64; "
                          f"the run has double_quant {sorted(dq)}, blocksize {sorted(bs)}. Use --format refquant.")
    dtype = str(run.dtype).replace("torch.", "")
    tensors = _other_tensors(run)
    for name, w in progress(list(run.modules.items()), desc="nf4 pack"):
        tensors.update({f"{name}.{k}": v for k, v in bnb_tensors(w, dtype).items()})
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "_load_in_4bit": True,
          "_load_in_8bit": False, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": dq.pop(),
          "bnb_4bit_compute_dtype": dtype, "bnb_4bit_quant_storage": "uint8", "llm_int8_threshold": 6.0,
          "llm_int8_skip_modules": None, "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False}
    _write_common(run, out, tensors, qc, {"format": "nf4"})
    return qc


def read_bnb_nf4(tensors: dict, prefix: str) -> "torch.Tensor":
    """Dequantize ``prefix.weight`` of a bitsandbytes 4-bit state dict as ``dequantize_4bit`` does
    (``QuantState.from_dict``: quant_state JSON; ``dequantize_blockwise(absmax, state2) + offset``
    under double quantization; ``code[nibble] * absmax[block]``, first element in the high nibble),
    in float32. bitsandbytes is not installed here: this follows its code (docs/export.md)."""
    state = json.loads(bytes(tensors[f"{prefix}.weight.quant_state.bitsandbytes__nf4"].tolist()).decode("utf-8"))
    packed = tensors[f"{prefix}.weight"].reshape(-1).to(torch.int64)
    nibbles = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    shape = state["shape"]
    numel = shape[0] * shape[1]
    code = tensors[f"{prefix}.weight.quant_map"]
    absmax = tensors[f"{prefix}.weight.absmax"]
    if "nested_blocksize" in state:
        block2 = torch.arange(absmax.shape[0]) // state["nested_blocksize"]
        nested = tensors[f"{prefix}.weight.nested_quant_map"][absmax.to(torch.int64)] * tensors[f"{prefix}.weight.nested_absmax"][block2]
        absmax = nested + torch.tensor(state["nested_offset"], dtype=torch.float32)
    block = torch.arange(numel) // state["blocksize"]
    return (code[nibbles[:numel]] * absmax[block]).reshape(shape)


def read_gptq_module(t: dict, bits: int, checkpoint_format: str = "gptq") -> "torch.Tensor":
    """Dequantize one GPTQ linear (``qweight``, ``qzeros``, ``scales``, ``g_idx``) as GPTQModel's
    ``dequantize_weight`` / AutoGPTQ's ``qlinear_cuda_old`` torch path reads it: shifts by the ``wf``
    table and masks (2/4/8 bits), the 3-bit word-straddling reassembly, v1 ``zeros + 1``;
    ``scales[g_idx] * (weight - zeros[g_idx])``, returned (out_features, in_features) in float16 as
    those kernels compute it. Independent of :func:`pack_bits` (a different unpacking route)."""
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"], t["g_idx"].long()
    maxq = (1 << bits) - 1
    if bits in (2, 4, 8):
        wf = torch.arange(0, 32, bits, dtype=torch.int32)
        zeros = (torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, 32 // bits), wf[None, None, :]) & maxq)
        zeros = zeros.reshape(scales.shape)
        weight = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 32 // bits, -1), wf[None, :, None]) & maxq
        weight = weight.reshape(-1, qweight.shape[1])
    elif bits == 3:
        wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                           [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12)
        zeros = qzeros.reshape(qzeros.shape[0], qzeros.shape[1] // 3, 3, 1).expand(-1, -1, -1, 12) >> wf.unsqueeze(0)
        zeros = zeros.clone()
        zeros[:, :, 0, 10] = (zeros[:, :, 0, 10] & 0x3) | ((zeros[:, :, 1, 0] << 2) & 0x4)
        zeros[:, :, 1, 11] = (zeros[:, :, 1, 11] & 0x1) | ((zeros[:, :, 2, 0] << 1) & 0x6)
        zeros = torch.cat([zeros[:, :, 0, :11], zeros[:, :, 1, 1:12], zeros[:, :, 2, 1:11]], dim=2) & 0x7
        zeros = zeros.reshape(scales.shape)
        weight = qweight.reshape(qweight.shape[0] // 3, 3, 1, qweight.shape[1]).expand(-1, -1, 12, -1) >> wf.unsqueeze(-1)
        weight = weight.clone() & 0x7
        weight[:, 0, 10] = (weight[:, 0, 10] & 0x3) | ((weight[:, 1, 0] << 2) & 0x4)
        weight[:, 1, 11] = (weight[:, 1, 11] & 0x1) | ((weight[:, 2, 0] << 1) & 0x6)
        weight = torch.cat([weight[:, 0, :11], weight[:, 1, 1:12], weight[:, 2, 1:11]], dim=1) & 0x7
        weight = weight.reshape(-1, qweight.shape[1])
    else:
        raise ValueError(f"GPTQ checkpoints hold 2, 3, 4 or 8 bits; got {bits}.")
    if checkpoint_format == "gptq":  # v1: zero - 1 was stored
        zeros = zeros + 1  # a stored zero of 0 (-1 before +1) is refused by gptq_tensors, so no wrap-around
    W = scales[g_idx] * (weight - zeros[g_idx]).to(torch.float16)
    return W.T.contiguous()


def read_compressed_tensors_module(t: dict, scheme_dict: dict) -> "torch.Tensor":
    """``PackedQuantizationCompressor.decompress`` of one module (the library's own decompressor)."""
    if PackedQuantizationCompressor is None:
        raise ImportError("reading a compressed-tensors export needs the compressed-tensors library.")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**scheme_dict["weights"]))
    return PackedQuantizationCompressor.decompress(dict(t), scheme)["weight"]


def load_dequantized(out: str | os.PathLike, dtype=None) -> dict:
    """The dequantized state dict of any export in ``out`` (HF names, torch tensors in ``dtype``,
    default the export's embedding dtype), read through each format's loader: GPTQ as GPTQModel
    unpacks it, compressed-tensors through its decompressor, bitsandbytes NF4 as
    ``dequantize_4bit`` computes it, refquant through :func:`load_refquant`."""
    _need_torch()
    out = Path(out)
    if (out / INDEX_FILE).exists():
        res = load_refquant(out, model=False, dtype=dtype)
        return res.state_dict
    config = json.loads((out / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    sd = {}
    for f in sorted(out.glob("model*.safetensors")):
        sd.update(_st_load(str(f)))
    dtype = dtype or sd["model.embed_tokens.weight"].dtype
    method = qc.get("quant_method")
    modules = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith((".qweight", ".weight_packed"))}
                     | {k[: -len(".weight.quant_map")] for k in sd if k.endswith(".weight.quant_map")})
    state = {}
    for name in modules:
        own = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        if method == "gptq":
            W = read_gptq_module(own, int(qc["bits"]), qc.get("checkpoint_format", "gptq"))
        elif method == "compressed-tensors":
            group = [g for g in qc["config_groups"].values() if "Linear" in g["targets"] or name in g["targets"]]
            W = read_compressed_tensors_module(own, group[0])
        elif method == "bitsandbytes":
            W = read_bnb_nf4(sd, name)
        else:
            raise ValueError(f"{out}: unknown quant_method {method!r}.")
        state[f"{name}.weight"] = W.to(dtype)
    for k, v in sd.items():
        if k.rsplit(".", 1)[0] not in modules and not any(k.startswith(m + ".") for m in modules):
            state[k] = v.to(dtype) if v.is_floating_point() else v
    return state


def load_model(out: str | os.PathLike, dtype=None):
    """A transformers ``LlamaForCausalLM`` with the dequantized weights of any export (:func:`load_dequantized`)."""
    if LlamaForCausalLM is None:
        raise ImportError("load_model needs transformers.")
    state = load_dequantized(out, dtype)
    config = json.loads((Path(out) / "config.json").read_text())
    dtype = dtype or state["model.embed_tokens.weight"].dtype
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "quantization_config"})).to(dtype)
    hf.load_state_dict(state, strict=True)  # copies into the dtype parameters
    return hf.eval()


# ---------------------------------------------------------------------------------------------
# refquant's own layout


def export_refquant(run: Run, out: Path) -> dict:
    """Every module's ``to_tensors()`` + an index naming its format class (any registered format)."""
    qtensors, index = {}, {}
    for name, w in progress(list(run.modules.items()), desc="refquant layout"):
        parts, meta = w.to_tensors()
        cls = type(w)
        index[name] = {"format": meta["format"], "class": f"{cls.__module__}.{cls.__qualname__}", "meta": meta,
                       "tensors": sorted(parts), "bits_per_weight": float(w.bits_per_weight),
                       "storage_bits": int(w.storage_bits)}
        qtensors.update({f"{name}.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in parts.items()})
    out.mkdir(parents=True, exist_ok=True)
    _st_save(qtensors, str(out / QUANTIZED_FILE))
    doc = {"refquant_layout": INDEX_VERSION, "serial_version": formats.SERIAL_VERSION, "modules": index,
           "storage_bits": int(sum(v["storage_bits"] for v in index.values()))}
    write_json_atomic(out / INDEX_FILE, doc)
    _write_common(run, out, _other_tensors(run), None, {"format": "refquant"})
    return doc


@dataclass
class RefquantExport:
    """What :func:`load_refquant` returns."""

    weights: dict  # module name -> WeightFormat (NumPy arrays, dtypes as written)
    state_dict: dict  # HF name -> torch tensor: the dequantized model (quantized modules in the model dtype)
    config: dict
    model: object = None  # transformers LlamaForCausalLM with the dequantized weights (with model=True)


def load_refquant(out: str | os.PathLike, model: bool = True, dtype=None) -> RefquantExport:
    """Read a ``--format refquant`` export: rebuild every weight object (``formats.from_tensors``) and
    the dequantized model (``model=True``: a transformers ``LlamaForCausalLM``; ``dtype`` default: the
    export's non-quantized tensors' dtype)."""
    _need_torch()
    out = Path(out)
    if not (out / INDEX_FILE).exists():
        raise FileNotFoundError(f"{out} has no {INDEX_FILE}: not a `refquant export --format refquant` output.")
    doc = json.loads((out / INDEX_FILE).read_text())
    if doc.get("refquant_layout") != INDEX_VERSION:
        raise ValueError(f"{out / INDEX_FILE}: layout version {doc.get('refquant_layout')!r}; this refquant reads {INDEX_VERSION}.")
    q = _st_load(str(out / QUANTIZED_FILE))
    rest = _st_load(str(out / "model.safetensors"))
    dtype = dtype or rest["model.embed_tokens.weight"].dtype
    weights, state = {}, dict(rest)
    for name, entry in doc["modules"].items():
        parts = {k: q[f"{name}.{k}"].numpy() for k in entry["tensors"]}
        w = formats.from_tensors(parts, entry["meta"])
        weights[name] = w
        state[f"{name}.weight"] = torch.from_numpy(np.asarray(w.dequantize())).to(dtype)
    config = json.loads((out / "config.json").read_text())
    hf = None
    if model:
        if LlamaForCausalLM is None:
            raise ImportError("load_refquant(model=True) needs transformers; pass model=False for the weights only.")
        hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "quantization_config"})).to(dtype)
        hf.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)  # copies into dtype params
        hf = hf.eval()
    return RefquantExport(weights, state, config, hf)


# ---------------------------------------------------------------------------------------------
# Entry point


def export(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike, checkpoint_format: str = "gptq",
           scale_dtype: str = "float16", overwrite: bool = False) -> dict:
    """Write the run in ``run_dir`` as ``fmt`` into ``out``; returns the quantization config / index written."""
    if fmt not in FORMAT_NAMES:
        raise ExportError(f"--format must be one of {FORMAT_NAMES}; got {fmt!r}.")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite.")
    run = read_run(run_dir)
    if fmt == "gptq":
        return export_gptq(run, out, checkpoint_format)
    if fmt == "compressed-tensors":
        return export_compressed_tensors(run, out, scale_dtype)
    if fmt == "nf4":
        return export_nf4(run, out)
    return export_refquant(run, out)


def add_parser(sub) -> None:
    """The ``refquant export`` subcommand (called by ``refquant/cli.py``)."""
    p = sub.add_parser("export", help="write a quantize run as a real quantized checkpoint (gptq, compressed-tensors, "
                                      "nf4 = bitsandbytes 4-bit, refquant)")
    p.add_argument("--run", required=True, help="a `refquant quantize --out` directory")
    p.add_argument("--format", required=True, choices=FORMAT_NAMES, dest="export_format")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--checkpoint-format", default="gptq", choices=["gptq", "gptq_v2"],
                   help="gptq: v1 (zero - 1 stored; what AutoGPTQ/transformers/vLLM read) or gptq_v2 (GPTQModel)")
    p.add_argument("--scale-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="compressed-tensors scale dtype (gptq: always float16)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd)


def _cmd(a) -> int:
    res = export(a.run, a.export_format, a.out, a.checkpoint_format, a.scale_dtype, a.overwrite)
    keys = {k: res[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "format") if k in res}
    print(json.dumps({"out": str(a.out), "format": a.export_format, **keys}, default=str))
    return 0
