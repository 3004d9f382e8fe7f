"""DB-LLM on the GPU (``pytest -m gpu``): the FDB twin against the golden outputs and the reference,
FDB layers in bf16, and a short Deviation-Aware Distillation of the tiny model on CUDA.

Skipped without CUDA. ``PYTHONPATH=. REFQUANT_DATA_DIR=../shared/data python -m pytest -m gpu tests/test_gpu_dbllm.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

import refquant as rq  # noqa: E402
from refquant import backends, golden, runs  # noqa: E402
from refquant import distill  # noqa: E402
from refquant.backends import torch_dbllm  # noqa: E402


def test_fdb_twin_passes_the_dbllm_golden_cases_on_cuda():
    manifest = golden.load_manifest()
    if not any(c.method == "dbllm" for c in golden.cases(manifest=manifest)):
        pytest.skip("no dbllm golden cases recorded yet (run tools/make_golden.py)")
    be = backends.get_backend("torch")
    reports = golden.parity_check(be, methods=["dbllm"], to_device=lambda a: torch.as_tensor(a).cuda(),
                                  to_numpy=be.to_numpy, include_slow=True)
    bad = [r for r in reports if not r["ok"]]
    assert reports and not bad, bad[:5]
    print(f"\ndbllm on cuda: {len(reports)} cases, min planes identical "
          f"{min(r['planes_identical_fraction'] for r in reports):.6f}, max scale rel diff "
          f"{max(r['scale_max_rel_diff'] for r in reports):.1e}")


@pytest.mark.parametrize("gs,offset,steps", [(128, "zero_point", 0), (None, "none", 0), (128, "zero_point", 3)])
def test_fdb_twin_on_cuda_matches_the_reference_on_a_llama_shape(gs, offset, steps):
    W = np.random.default_rng(0).standard_t(4, size=(64, 4096)) * 0.02
    H = None
    if steps:
        X = np.random.default_rng(1).normal(size=(512, 4096))
        H = X.T @ X / 512
    ref = rq.dbllm(W, H, group_size=gs, offset=offset, steps=steps)
    got = backends.get_backend("torch").dbllm(torch.as_tensor(W).cuda(), None if H is None else torch.as_tensor(H).cuda(),
                                              group_size=gs, offset=offset, steps=steps)
    same = float(np.mean(got.b1.cpu().numpy() == ref.b1)) * 0.5 + float(np.mean(got.b2.cpu().numpy() == ref.b2)) * 0.5
    assert same >= 0.9999
    if steps == 0:
        assert same == 1.0 and np.array_equal(got.a1.cpu().numpy(), ref.a1)
    assert got.info["objective"] == pytest.approx(ref.info["objective"], rel=1e-6)


def test_fdb_linear_in_bf16_on_cuda():
    lin = torch.nn.Linear(512, 256, bias=False).cuda()
    fmt = backends.get_backend("torch").dbllm(lin.weight, group_size=128)
    mod = torch_dbllm.FDBLinear(lin.weight, fmt.a1, fmt.a2, fmt.offset, 128)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    y = mod(x)
    want = x.float() @ fmt.dequantize().float().T
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), want, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert torch.isfinite(mod.a1.grad).all() and mod.a1.grad.abs().sum() > 0


def test_short_distillation_of_the_tiny_model_on_cuda():
    teacher = runs.load(runs.DEFAULT_MODEL, "torch", "cuda", "float32").model.cuda()
    init = distill.fdb_init(teacher, group_size=128)
    cfg = distill.DistillConfig(steps=20, batch_size=4, lr=1e-4, scale_lr=2e-3, schedule="constant", save_every=20)
    windows = np.random.default_rng(0).integers(0, 4096, size=(8, 256))
    student = distill.make_student(teacher, init, cfg)
    hist = distill.distill(teacher, student, windows, cfg, device="cuda")
    first = np.mean([h["loss"] for h in hist[:4]])
    last = np.mean([h["loss"] for h in hist[-4:]])
    assert last < first, (first, last)
