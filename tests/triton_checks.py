"""Shared helpers of the Triton kernel tests (GPTQ, PB-LLM, BiLLM, QuIP, SliM-LLM, the evaluator).

* :func:`interpreter_run` -- run a check script in a fresh Python with ``TRITON_INTERPRET=1`` (the
  interpreter must be chosen before Triton is imported, hence the subprocess) and return the JSON dict
  its last line prints;
* :func:`sm90_asm` / :func:`sm90_ptx` -- compile a kernel ahead of time for an H200 (sm_90) without a GPU
  and return its assembly stages (``ttgir``, ``ptx``, ...) / its PTX, for the tests that read the arithmetic
  the kernel really runs (no FMA contraction, IEEE division, no barriers).

Both skip the test when Triton (or its ahead-of-time API, or a CUDA toolchain) is missing; Triton is an
optional dependency, so it is imported here only when a test asks for it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def interpreter_run(script: str, timeout: int = 600) -> dict:
    """The JSON dict printed on the last line of ``script``, run with ``TRITON_INTERPRET=1`` and the repo on the path."""
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def sm90_asm(fn, signature: dict, constexprs: dict, num_warps: int, enable_fp_fusion: bool | None = False) -> dict:
    """The assembly stages of the ``@triton.jit`` kernel ``fn`` compiled for sm_90 (``enable_fp_fusion=None``:
    Triton's default)."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("interpreter mode")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    options = {"num_warps": num_warps}
    if enable_fp_fusion is not None:
        options["enable_fp_fusion"] = enable_fp_fusion
    try:
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # noqa: BLE001 - a toolchain problem, not a kernel bug, is a skip
        if "ptxas" in str(e).lower() or "not found" in str(e).lower():
            pytest.skip(f"no CUDA toolchain for ahead-of-time compile: {e}")
        raise
    return k.asm


def sm90_ptx(fn, signature: dict, constexprs: dict, num_warps: int, enable_fp_fusion: bool | None = False) -> str:
    """The PTX of :func:`sm90_asm`."""
    return sm90_asm(fn, signature, constexprs, num_warps, enable_fp_fusion)["ptx"]
