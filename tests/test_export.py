"""``refquant export``: every format round-trips to exactly our dequantized weights (docs/export.md).

One real run of the tiny model (RTN 4-bit g128 through ``runs.quantize``) is the base; GPTQ with
act-order, per-channel 8-bit, 2/3-bit and NF4 weights (reference functions on the tiny model's own
weights) are put into copies of it as a run stores them, then exported and read back with each
format's own reader: compressed-tensors through transformers' loader / the library's decompressor,
GPTQ as GPTQModel unpacks it (``export.read_gptq_module``), bitsandbytes NF4 as ``dequantize_4bit``
computes it (bitsandbytes is not installed: ``export.read_bnb_nf4`` follows its code).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from refquant import export, pipeline, runs  # noqa: E402
from refquant.cli import main as cli_main  # noqa: E402
from refquant.spec import formats, safetensors_io  # noqa: E402
from refquant.spec.billm import billm  # noqa: E402
from refquant.spec.dbllm import dbllm  # noqa: E402
from refquant.spec.gptq import gptq  # noqa: E402
from refquant.spec.icq import icq  # noqa: E402
from refquant.spec.normalfloat import NF4_CODE, nf4  # noqa: E402
from refquant.spec.pbllm import pbllm  # noqa: E402
from refquant.spec.quantizer import QuantSpec  # noqa: E402
from refquant.spec.quip import quip  # noqa: E402
from refquant.spec.rtn import rtn  # noqa: E402
from refquant.spec.slim import slim_llm  # noqa: E402

L0 = "model.layers.0."


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A real ``refquant quantize`` run directory: RTN 4-bit g128 asymmetric, torch CPU float32."""
    out = tmp_path_factory.mktemp("rtn4")
    loaded = runs.load(runs.DEFAULT_MODEL, "torch", "cpu", "float32")
    cfg = pipeline.QuantConfig.of("rtn", wbits=4, group_size=128)
    runs.quantize(loaded, cfg, None, out_dir=out, run_info={"ids": "test"}, batch_size=2)
    runs.save_model(loaded, out, {"config": cfg.to_dict(), "act_quant": {}, "source_model": "tiny"})
    return out


def weights_of(run_dir):
    return {k: v.double().numpy() for k, v in export.read_run(run_dir).tensors.items()}


def hessian(n, seed=0):
    X = np.random.default_rng(seed).standard_normal((4 * n, n))
    return X.T @ X / X.shape[0]


def with_modules(base, out, make):
    """Copy run ``base`` to ``out`` and replace modules by ``make(name, W)`` (a WeightFormat or None),
    written into ``quantized/layer_XXX.*`` exactly as ``runs.LayerStore.write`` stores them."""
    shutil.copytree(base, out)
    W = weights_of(base)
    n_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    for i in range(n_layers):
        path = out / "quantized" / f"layer_{i:03d}"
        t = safetensors_io.read(path.with_suffix(".safetensors"))
        meta = json.loads(path.with_suffix(".json").read_text())
        for name in list(meta["formats"]):
            fmt = make(f"model.layers.{i}.{name}", W[f"model.layers.{i}.{name}.weight"])
            if fmt is None:
                continue
            t = {k: v for k, v in t.items() if not k.startswith(name + ".")}
            parts, meta["formats"][name] = fmt.to_tensors()
            t.update({f"{name}.{k}": v for k, v in parts.items()})
        safetensors_io.write(path.with_suffix(".safetensors"), t)
        path.with_suffix(".json").write_text(json.dumps(meta))
    return out


def fp16_scaled(w: formats.AffineWeight, width=np.float16):
    """Our dequantization with the scale at the format's width (float16 unless told)."""
    s = np.asarray(w.scale, dtype=width).astype(np.float64)
    return formats.AffineWeight(np.asarray(w.codes), s, np.asarray(w.zero), np.asarray(w.g_idx), w.spec).dequantize()


def check_exact(out, run_dir, expected=lambda w: w.dequantize(), dtype=torch.float64, cast=None):
    state = export.load_dequantized(out, dtype)
    run = export.read_run(run_dir)
    for name, w in run.modules.items():
        want = torch.as_tensor(np.asarray(expected(w), dtype=np.float64))
        if cast is not None:
            want = want.to(cast).to(torch.float64)
        got = state[f"{name}.weight"].to(torch.float64)
        assert torch.equal(got, want), f"{name}: max |diff| {float((got - want).abs().max())}"
    for k in ("model.embed_tokens.weight", "lm_head.weight", L0 + "input_layernorm.weight"):
        assert torch.equal(state[k].to(torch.float64), run.tensors[k].to(torch.float64))
    return state


# ---------------------------------------------------------------------------------------------
# GPTQ


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 32), (4, 32), (8, 32), (4, None), (8, None)])
def test_gptq_packing_matches_gptqmodel_reader(bits, group_size):
    """Our AutoGPTQ bit-stream packer vs the GPTQModel/AutoGPTQ unpacking (3-bit word straddling)."""
    rng = np.random.default_rng(bits)
    spec = QuantSpec(bits, group_size=group_size)
    W = rng.standard_normal((64, 96))
    w = rtn(W, spec)
    w = formats.AffineWeight(w.codes, w.scale, np.maximum(w.zero, 1), w.g_idx, spec)  # v1 needs zero >= 1
    t = export.gptq_tensors(w)
    n_groups = 3 if group_size else 1
    assert t["qweight"].shape == (96 * bits // 32, 64) and t["qzeros"].shape == (n_groups, 64 * bits // 32)
    assert t["qweight"].dtype == torch.int32 and t["scales"].dtype == torch.float16
    got = export.read_gptq_module(t, bits).double()
    assert torch.equal(got, torch.as_tensor(fp16_scaled(w)).to(torch.float16).double())
    codes = export.unpack_bits(t["qweight"].numpy(), bits, axis=0)
    assert np.array_equal(codes.T, np.asarray(w.codes))
    # v1 convention: the stored zero is zero - 1
    assert np.array_equal(export.unpack_bits(t["qzeros"].numpy(), bits, axis=1).T, np.asarray(w.zero) - 1)


def test_gptq_4bit_first_word_layout():
    """Code k of 8 sits in bits 4k..4k+3 of the word (the low nibble holds the first input column)."""
    codes = np.arange(32 * 32).reshape(32, 32) % 16
    packed = export.pack_bits(codes.T, 4, axis=0)  # (in=32, out=32) -> (4, 32)
    word = int(packed[0, 0].view(np.uint32))
    assert [(word >> (4 * k)) & 15 for k in range(8)] == list(codes[0, :8])


def test_gptq_export_act_order_and_per_channel(base_run, tmp_path):
    """GPTQ act-order g128 4-bit (desc_act, permuted g_idx) on q_proj of layer 0 and the RTN 4-bit rest."""
    spec = QuantSpec(4, group_size=128)

    def make(name, W):
        if name.startswith(L0) and name.endswith("q_proj"):
            return gptq(W, hessian(W.shape[1]), spec, act_order=True)
        return None

    run = with_modules(base_run, tmp_path / "run", make)
    qw = export.read_run(run).modules[L0 + "self_attn.q_proj"]
    assert not qw.trivial_g_idx
    if any((np.asarray(w.zero) == 0).any() for w in export.read_run(run).modules.values()):
        with pytest.raises(export.ExportError, match="gptq_v2"):
            export.export(run, "gptq", tmp_path / "v1")
    qc = export.export(run, "gptq", tmp_path / "gptq", checkpoint_format="gptq_v2")
    assert qc["desc_act"] is True and qc["bits"] == 4 and qc["group_size"] == 128
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq_v2"
    check_exact(tmp_path / "gptq", run, fp16_scaled, cast=torch.float16)


@pytest.mark.slow
def test_gptq_v1_8bit_per_channel_sym(base_run, tmp_path):
    spec = QuantSpec(8, group_size=None, sym=True)
    run = with_modules(base_run, tmp_path / "run", lambda name, W: rtn(W, spec))
    assert export.export(run, "gptq", tmp_path / "gptq")["group_size"] == -1
    st = safetensors_io.read(tmp_path / "gptq" / "model.safetensors")
    assert st[L0 + "self_attn.q_proj.scales"].shape == (1, 256) and st[L0 + "mlp.down_proj.g_idx"].max() == 0
    check_exact(tmp_path / "gptq", run, fp16_scaled, cast=torch.float16)


# ---------------------------------------------------------------------------------------------
# compressed-tensors


def test_compressed_tensors_transformers_loads_sym(base_run, tmp_path):
    """Symmetric 4-bit g128 through transformers' own compressed-tensors loader (CPU, decompressed)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    spec = QuantSpec(4, group_size=128, sym=True)
    run = with_modules(base_run, tmp_path / "run", lambda name, W: rtn(W, spec))
    export.export(run, "compressed-tensors", tmp_path / "ct", scale_dtype="float32")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["quant_method"] == "compressed-tensors"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    sd = model.state_dict()
    for name, w in export.read_run(run).modules.items():
        want = torch.as_tensor(fp16_scaled(w, np.float32)).to(torch.float32)  # float32 scales, float32 arithmetic
        assert torch.equal(sd[f"{name}.weight"], want), name


@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, False), (8, None, False), (8, None, True), (4, None, True)])
def test_compressed_tensors_compressor_round_trip(bits, group_size, sym):
    """One module through the library's PackedQuantizationCompressor and back (its decompressor)."""
    pytest.importorskip("compressed_tensors")
    spec = QuantSpec(bits, group_size=group_size, sym=sym)
    w = rtn(np.random.default_rng(bits).standard_normal((64, 256)), spec)
    args = export._ct_args(w, torch.float32)
    t = export.ct_module_tensors(w, export.QuantizationScheme(targets=["Linear"], weights=args), torch.float32)
    assert t["weight_packed"].shape == (64, 256 * bits // 32) and ("weight_zero_point" in t) == (not sym)
    W = export.read_compressed_tensors_module(t, {"weights": args.model_dump()})
    assert torch.equal(W, torch.as_tensor(fp16_scaled(w, np.float32)).to(torch.float32))


@pytest.mark.slow
def test_compressed_tensors_asym_decompressor(base_run, tmp_path):
    """The asymmetric 4-bit g128 run through the library's decompressor (float16 scales).

    (transformers' loader cannot take asymmetric pack-quantized in compressed-tensors 0.20: its
    meta-device compress leaves the zero point unpacked; docs/export.md.)"""
    pytest.importorskip("compressed_tensors")
    export.export(base_run, "compressed-tensors", tmp_path / "ct4")
    check_exact(tmp_path / "ct4", base_run, fp16_scaled, cast=torch.float16)


def test_compressed_tensors_refusals(base_run, tmp_path):
    pytest.importorskip("compressed_tensors")
    run3 = with_modules(base_run, tmp_path / "run3", lambda name, W: rtn(W, QuantSpec(3, group_size=128)))
    with pytest.raises(export.ExportError, match="WNA16"):
        export.export(run3, "compressed-tensors", tmp_path / "ct3")
    ao = with_modules(base_run, tmp_path / "ao", lambda name, W: gptq(W, hessian(W.shape[1]), QuantSpec(4, group_size=128),
                                                                    act_order=True) if name == L0 + "self_attn.k_proj" else None)
    with pytest.raises(export.ExportError, match="g_idx"):
        export.export(ao, "compressed-tensors", tmp_path / "ctao")


# ---------------------------------------------------------------------------------------------
# NF4 (bitsandbytes layout)


@pytest.mark.parametrize("double_quant", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_nf4_bitsandbytes_layout(base_run, tmp_path, double_quant):
    run = with_modules(base_run, tmp_path / "run", lambda name, W: nf4(W, blocksize=64, double_quant=double_quant))
    qc = export.export(run, "nf4", tmp_path / "nf4")
    assert qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] == double_quant
    st = safetensors_io.read(tmp_path / "nf4" / "model.safetensors")
    p = L0 + "self_attn.k_proj.weight"
    assert st[p].dtype == np.uint8 and st[p].shape == (64 * 256 // 2, 1)
    state = json.loads(bytes(st[p + ".quant_state.bitsandbytes__nf4"]).decode())
    assert state["quant_type"] == "nf4" and state["blocksize"] == 64 and state["shape"] == [64, 256]
    assert ("nested_offset" in state) == double_quant and ((p + ".nested_absmax") in st) == double_quant
    assert np.array_equal(st[p + ".quant_map"], NF4_CODE.astype(np.float32))
    check_exact(tmp_path / "nf4", run, lambda w: w.dequantize_fp32(), dtype=torch.float32)


def test_nf4_refuses_icq_and_affine(base_run, tmp_path):
    with pytest.raises(export.ExportError, match="NF4Weight"):
        export.export(base_run, "nf4", tmp_path / "a")
    run = with_modules(base_run, tmp_path / "run", lambda name, W: icq(W) if name == L0 + "self_attn.k_proj" else
                       nf4(W, double_quant=True))
    with pytest.raises(export.ExportError, match="tau"):
        export.export(run, "nf4", tmp_path / "b")
    with pytest.raises(export.ExportError, match="AffineWeight"):
        export.export(run, "gptq", tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# refquant layout: every registered format


BUILDERS = {  # one weight of every registered format class, made by its reference function
    "affine": lambda W, H: gptq(W, H, QuantSpec(3, group_size=128), act_order=True),
    "binary": lambda W, H: formats.binarize_rows(W),
    "codebook": lambda W, H: formats.CodebookWeight(
        np.random.default_rng(0).integers(0, 16, W.shape).astype(np.uint8), NF4_CODE.astype(np.float64),
        np.random.default_rng(1).random(W.size // 64) + 0.5, block_size=64),
    "mixed": lambda W, H: slim_llm(W, H, bits=2, group_bits=np.array([1, 3]), group_size=128),
    "partial_binary": lambda W, H: pbllm(W, H),
    "structured_binary": lambda W, H: billm(W, H),
    "quip": lambda W, H: quip(W, H, bits=2),
    "dual_binary": lambda W, H: dbllm(W, H),
    "nf4": lambda W, H: nf4(W, double_quant=True),
    "icq": lambda W, H: icq(W),
}
SLOTS = [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("k_proj", "v_proj")] + \
        [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


def test_refquant_layout_every_format(base_run, tmp_path):
    assert set(BUILDERS) == set(formats.FORMATS), \
        "a registered format has no example here: add one (refquant export must carry every format)"
    where = dict(zip(SLOTS, BUILDERS))
    H = hessian(256)
    run = with_modules(base_run, tmp_path / "run", lambda name, W: BUILDERS[where[name]](W, H) if name in where else None)
    export.export(run, "refquant", tmp_path / "rq")
    res = export.load_refquant(tmp_path / "rq", model=True, dtype=torch.float64)
    assert {type(w) for w in res.weights.values()} == set(formats.FORMATS.values())
    for name, w in export.read_run(run).modules.items():
        back = res.weights[name]
        assert type(back) is type(w) and type(w).format_name == where.get(name, "affine")
        a, b = w.to_tensors(), back.to_tensors()
        assert a[1] == b[1] and a[0].keys() == b[0].keys()
        assert all(np.array_equal(a[0][k], b[0][k]) for k in a[0])
        assert np.array_equal(np.asarray(back.dequantize()), np.asarray(w.dequantize()))
        assert torch.equal(res.model.state_dict()[f"{name}.weight"], torch.as_tensor(np.asarray(w.dequantize())))
    index = json.loads((tmp_path / "rq" / export.INDEX_FILE).read_text())
    assert index["modules"][SLOTS[0]]["class"].endswith("AffineWeight")


# ---------------------------------------------------------------------------------------------
# refusals and the command line


def test_refusals(base_run, tmp_path):
    with pytest.raises(export.ExportError, match="not a finished"):
        export.export(tmp_path, "gptq", tmp_path / "x")
    run = with_modules(base_run, tmp_path / "run", lambda name, W: formats.binarize_rows(W) if name == L0 + "mlp.up_proj" else None)
    with pytest.raises(export.ExportError, match="BinaryWeight"):
        export.export(run, "gptq", tmp_path / "g")
    with pytest.raises(export.ExportError, match="5 bits|2, 3, 4 or 8"):
        export.gptq_tensors(rtn(np.ones((32, 32)) + np.eye(32), QuantSpec(5, group_size=32)))
    zero0 = rtn(np.abs(np.random.default_rng(1).standard_normal((32, 32))) + 0.1, QuantSpec(4, group_size=32))
    assert (np.asarray(zero0.zero) == 0).all()
    with pytest.raises(export.ExportError, match="gptq_v2"):
        export.gptq_tensors(zero0)
    assert export.read_gptq_module(export.gptq_tensors(zero0, "gptq_v2"), 4, "gptq_v2").shape == (32, 32)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(FileExistsError):
        export.export(base_run, "refquant", tmp_path / "busy")
    recipe = json.loads((base_run / "refquant.json").read_text())
    sq = tmp_path / "sq"
    shutil.copytree(base_run, sq)
    (sq / "refquant.json").write_text(json.dumps({**recipe, "act_quant": {"0": {"self_attn.q_proj": {"bits": 8}}}}))
    with pytest.raises(export.ExportError, match="activations"):
        export.export(sq, "gptq", tmp_path / "sqo")


def test_cli_export(base_run, tmp_path, capsys):
    assert cli_main(["export", "--run", str(base_run), "--format", "refquant", "--out", str(tmp_path / "o")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == "refquant"
    assert cli_main(["export", "--run", str(base_run), "--format", "nf4", "--out", str(tmp_path / "n")]) == 2
    assert "NF4Weight" in capsys.readouterr().err
