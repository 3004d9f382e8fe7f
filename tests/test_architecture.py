"""The house rules of docs/architecture.md, checked.

* the import-linter contracts of pyproject.toml (layers point down: application -> backends -> spec;
  the spec imports no torch/triton/transformers/CuPy, not even inside a function) hold, and an arrow
  that points up breaks them;
* a method is one wiring unit: a new module in ``refquant/methods/`` reaches the CLI, the golden
  tool, the benchmark, the main job and the loop with no other file edited;
* the installed names: nothing called ``backends`` at the top level.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` (import-linter) on the tree at ``cwd`` with the contracts of its pyproject.toml."""
    pytest.importorskip("importlinter", reason="pip install -e '.[test]' (import-linter)")
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_import_contracts_hold():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout, out.stdout[-2000:]


@pytest.mark.parametrize("where, line, broken", [
    # the spec may not import the application, not even inside a function
    ("refquant/spec/rtn.py", "def _up():\n    from .. import pipeline  # noqa\n", "every import points down"),
    # nor torch
    ("refquant/spec/quantizer.py", "def _torch():\n    import torch  # noqa\n", "NumPy/SciPy only"),
    # the backends may not import the layer loop
    ("refquant/backends/numpy_backend.py", "from .. import runs  # noqa\n", "every import points down"),
])
def test_an_upward_import_breaks_the_contracts(tmp_path, where, line, broken):
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "refquant", tree / "refquant", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    path = tree / where
    path.write_text(path.read_text() + "\n\n" + line)
    out = _lint(tree)
    assert out.returncode != 0, out.stdout[-2000:]
    assert "1 kept, 1 broken" in out.stdout and broken in out.stdout.split("Broken contracts")[-1], out.stdout[-2000:]


NEW_METHOD = '''
"""A toy method added as one file: rounds every linear to the nearest multiple of ``step``."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..backends.protocols import QuantOps
from ..golden import GoldenSuite
from ..pipeline import Method, Options, QuantConfig, register
from ..spec import llama


@dataclass(frozen=True)
class ToyOptions(Options):
    toy_flag: bool = field(default=False, metadata={"help": "a toy switch"})
    toy_level: int = field(default=3, metadata={"help": "a toy number"})


def cases():
    yield "nasty256", "nasty256_toy", {"spec": {"bits": 4}}, False


@register
class Toy(Method):
    name = "toy"
    Options = ToyOptions
    ops = QuantOps
    needs_calibration = False
    golden = (GoldenSuite("toy", cases, lambda p: {"exact": [], "bitwise": []}, {"text": "toy"},
                          lambda *a: {}, lambda *a: {"ok": True}),)
    preflight = ("toy",)
    bench_preset = {"wbits": 4, "group_size": 128, "toy_level": 5}
    bench_default = True
    suites = ("toysuite",)

    def study_rows(self, suite):
        return [("toy_w4", "Toy", QuantConfig.of("toy", wbits=4, toy_level=2))] if suite == "toysuite" else []

    def quantize_layer(self, ctx):
        for name in llama.LINEARS:
            ctx.set_quantized(name, ctx.ops.rtn(ctx.get(name), ctx.config.weight_spec()))
'''


def test_a_new_method_is_one_file(tmp_path):
    """Drop a wiring unit into refquant/methods/ of a copy of the tree: the registry, the CLI (its options as
    flags), the golden tool, the benchmark and the main job all see it; no other file is edited."""
    tree = tmp_path / "tree"
    for d in ("refquant", "tools", "golden"):
        shutil.copytree(ROOT / d, tree / d, ignore=shutil.ignore_patterns("__pycache__", "models"))
    (tree / "refquant" / "methods" / "toy.py").write_text(textwrap.dedent(NEW_METHOD))
    code = textwrap.dedent('''
        import sys
        sys.path.insert(0, "tools")
        from refquant import cli, golden, mainjob, pipeline
        import make_golden
        assert "toy" in pipeline.METHODS and "toy" in golden.SUITES
        a = cli.build_parser().parse_args(["quantize", "--method", "toy", "--toy-flag", "--toy-level", "7", "--out", "x"])
        cfg = cli.config_from_args(a)
        assert cfg.options.toy_flag is True and cfg.options.toy_level == 7, cfg
        try:
            cli.config_from_args(cli.build_parser().parse_args(["quantize", "--method", "rtn", "--toy-level", "7",
                                                                "--out", "x"]))
        except ValueError as e:
            assert "option of toy" in str(e), e
        else:
            raise AssertionError("an option of another method was accepted")
        assert "toy" in make_golden.parity_rules()
        assert any(s.name == "toy" for s, *_ in make_golden.case_grid())
        assert "toysuite" in mainjob.suites()
        rows = mainjob.suite_rows(None, "toysuite")
        assert rows[0][2].options.toy_level == 2
        # the golden tool adds the new suite's case beside the recorded ones and changes none of them
        import json
        before = json.loads(open("golden/manifest.json").read())
        assert make_golden.main([]) == 0
        after = json.loads(open("golden/manifest.json").read())
        assert set(after["cases"]) == set(before["cases"]) | {"toy/nasty256_toy"}
        assert all(after["cases"][n] == before["cases"][n] for n in before["cases"])
        assert after["generator"] == before["generator"] and "generator" in after["cases"]["toy/nasty256_toy"]
        assert after["parity_rules"]["toy"] == {"text": "toy"}
        print("ok")
    ''')
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tree)}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    for rel in ("rtn/nasty256_w4_asym_g128.npz", "gptq/odd1000_w3_sym_g128_actorder.npz", "inputs/nasty256.npz"):
        assert (tree / "golden" / rel).read_bytes() == (ROOT / "golden" / rel).read_bytes(), rel
    assert (tree / "golden" / "toy" / "nasty256_toy.npz").exists()


def test_nothing_named_backends_at_the_top_level():
    """The backends install as ``refquant.backends``: no top-level ``backends`` package to collide with."""
    assert not (ROOT / "backends").exists()
    import refquant.backends

    assert refquant.backends.__name__ == "refquant.backends"
    import tomllib

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["refquant*"]


def test_public_api():
    import refquant as rq

    for name in ("QuantSpec", "rtn", "gptq", "hessian", "QuantizedWeight"):
        assert hasattr(rq, name), name
    assert rq.awq.search_scale and rq.awq.search_clip and rq.smoothquant.smooth_scales
    assert rq.aweq.equalization_scales and rq.actquant.quantize_activation


def test_quant_config_has_typed_options_that_round_trip():
    import json

    from refquant import pipeline
    from refquant.methods.awq import AWQOptions
    from refquant.methods.gptq import GPTQOptions

    cfg = pipeline.QuantConfig.of("awq", wbits=3, awq_search_samples=4)
    assert isinstance(cfg.options, AWQOptions) and cfg.options.awq_search_samples == 4 and cfg.wbits == 3
    assert pipeline.QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert pipeline.QuantConfig("gptq").options == GPTQOptions()  # the authors' defaults
    with pytest.raises(ValueError, match="unknown setting"):
        pipeline.QuantConfig.of("rtn", act_order=True)
    with pytest.raises(ValueError, match="must be a GPTQOptions"):
        pipeline.QuantConfig("gptq", options=AWQOptions())
    with pytest.raises(ValueError, match="blocksize"):
        pipeline.QuantConfig.of("gptq", blocksize=0)


def test_a_backend_without_the_methods_twin_is_refused():
    """The loop checks the method's ops protocol before the first layer and names what is missing."""
    import numpy as np

    from refquant import pipeline
    from refquant.backends.numpy_backend import NumpyBackend
    from refquant.spec import llama

    class NoAWQ:  # the numpy backend's quantizer and statistics, without the AWQ family
        def __init__(self):
            self._be = NumpyBackend()

        rtn = property(lambda self: self._be.rtn)

    cfg = llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, head_dim=4)
    model = llama.LlamaModel(cfg, np.zeros((8, 8)), [{}], np.ones(8), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="AWQOpsForPipeline"):
        pipeline.quantize_model(pipeline.NumpyRunner(model, ops=NoAWQ()), pipeline.QuantConfig.of("awq", wbits=4),
                                np.zeros((1, 4), dtype=np.int64))


def test_a_method_may_change_and_collect_only_what_it_declares():
    """``Method.touches`` / ``Method.statistics`` are enforced by the layer context."""
    import numpy as np

    from refquant import pipeline
    from refquant.backends.numpy_backend import NumpyBackend

    class Runner:
        ops = NumpyBackend()

        def set(self, layer, name, value):
            layer[name] = value

        def in_features(self, group):
            return 4

    ctx = pipeline.LayerContext(index=0, layer={}, runner=Runner(), config=pipeline.QuantConfig.of("gptq"), inputs=None)
    with pytest.raises(ValueError, match="does not declare in Method.touches"):
        ctx.set("input_layernorm", np.ones(4))  # GPTQ changes linears only
    ctx.set("mlp.down_proj", np.ones((4, 4)))
    with pytest.raises(ValueError, match="does not declare in Method.statistics"):
        ctx.collect({"attn_in": ("absmax",)})
