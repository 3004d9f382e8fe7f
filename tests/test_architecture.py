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
    for d in ("refquant", "tools"):
        shutil.copytree(ROOT / d, tree / d, ignore=shutil.ignore_patterns("__pycache__"))
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
        print("ok")
    ''')
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tree)}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


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
