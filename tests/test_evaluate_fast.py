"""The evaluator's fast-path planning (refquant/evaluate.py, issue 13 "Speed"): MMLU questions packed into
rows against a cached prefix, zero-shot batches cut where rows get ragged, the LM-head scores without the
full log-softmax, the fused RMSNorm/MLP dispatch; each against the batch-1 reference on the tiny model.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from refquant import evaluate as ev  # noqa: E402
from refquant import torch_pipeline  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "golden" / "models" / "tiny-llama3"


@pytest.fixture(scope="module")
def model():
    return torch_pipeline.load_model(str(TINY), dtype=torch.float32, device="cpu")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=60), st.sampled_from([16, 64, 512]))
def test_pack_is_a_balanced_partition(lengths, width):
    bins = ev._pack(lengths, width)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    cap = max(width, max(lengths))
    assert len(bins) <= math.ceil(sum(lengths) / cap)
    fills = [sum(lengths[i] for i in b) for b in bins]
    # LPT: the fullest bin exceeds the least filled by at most one item
    assert max(fills) - min(fills) <= max(lengths)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 120)), min_size=1, max_size=40),
       st.sampled_from([256, 1024, 8192]))
def test_prefix_plan_covers_every_item_once_within_budget(spec, budget):
    prefixes = {0: [1] * 10, 1: [2] * 50, 2: []}
    items = [(prefixes[p], [3] * n) for p, n in spec]
    plan = ev.prefix_plan(items, budget, pack_width=64)
    seen = [i for _, rows, _ in plan for row in rows for i in row]
    assert sorted(seen) == list(range(len(items)))
    order = [pre for pre, _, _ in plan]
    assert len({p for p in order}) == sum(1 for a, b in zip([None] + order, order) if a != b)  # prefixes contiguous
    for pre, rows, width in plan:
        assert all(tuple(items[i][0]) == pre for row in rows for i in row)
        # width: the fullest row of the prefix's rows (every batch of that prefix)
        assert width == max(sum(len(items[i][1]) for i in row) for p, rs, _ in plan if p == pre for row in rs)
        if len(rows) > 1:
            assert len(rows) * width <= budget and len(rows) * (len(pre) + width) <= ev.KV_FACTOR * budget


def test_batches_cut_ragged_rows():
    lengths = [100] * 10 + [98] * 10 + [50] * 10
    b = ev._batches(lengths, budget=10_000, slack=0.01, min_fill=0.05)
    assert [sorted(lengths[i] for i in x) for x in b] == [[100] * 10, [98] * 10, [50] * 10]
    assert ev._batches(lengths, budget=10_000, slack=0.01, min_fill=1.0) == [list(range(30))]  # never ragged-cut
    assert all(max(lengths[i] for i in x) * len(x) <= 500 for x in ev._batches(lengths, budget=500))


def test_prefix_logprobs_packed_equals_batch1(model):
    rng = np.random.default_rng(0)
    pres = [rng.integers(0, 4096, 30).tolist(), rng.integers(0, 4096, 45).tolist(), []]
    items = [(pres[i % 3], rng.integers(0, 4096, int(rng.integers(1, 25))).tolist()) for i in range(17)]
    letters = [32, 33, 34, 35]
    plan = ev.prefix_plan(items, 80, pack_width=40)
    assert any(len(row) > 1 for _, rows, _ in plan for row in rows)        # questions share rows
    assert len(plan) > len({p for p, _, _ in plan})                         # a prefix spans batches
    fast = ev.prefix_logprobs_fast(model, items, letters, token_budget=80, pack_width=40)
    ref = np.zeros_like(fast)
    with torch.no_grad():
        for i, (p, s) in enumerate(items):
            logits = model(input_ids=torch.tensor(p + s)[None], use_cache=False).logits[0, -1]
            ref[i] = torch.log_softmax(logits.float(), -1)[letters].double().numpy()
    assert np.abs(fast - ref).max() <= 1e-4                                  # measured ~5e-6
    assert (fast.argmax(1) == ref.argmax(1)).all()


def test_head_scores_equal_log_softmax(model):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, model.config.hidden_size, generator=g)
    t = torch.randint(0, model.config.vocab_size, (37,), generator=g)
    with torch.no_grad():
        picked, hits = ev._head_scores(model, h, t)
        logp = ev._head_logprobs(model, h)
    assert torch.allclose(picked, logp.gather(1, t[:, None])[:, 0], atol=1e-5, rtol=0)
    assert torch.equal(hits, logp.argmax(-1) == t)
    t[:5] = logp[:5].argmax(-1)
    assert ev._head_scores(model, h, t)[1][:5].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_mlp_equal_the_modules(model, dtype):
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, model.config.hidden_size, generator=g) * 2).to(dtype)
    norm, mlp = [m.to(dtype) for m in (layer.input_layernorm, layer.mlp)]
    try:
        with torch.no_grad():
            assert ev._plain_rms_norm(norm) and ev._plain_mlp(mlp)
            a, b = ev._norm(norm, x), norm(x)
            assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), atol=0, rtol=2e-6 if dtype == torch.float32 else 0)
            a, b = ev._mlp(mlp, x), mlp(x)
            assert torch.allclose(a.float(), b.float(), atol=0, rtol=1e-6 if dtype == torch.float32 else 0)
            # a hooked norm or MLP is called as a module (its hook runs)
            calls = []
            hook = norm.register_forward_hook(lambda *a: calls.append(1))
            try:
                assert not ev._plain_rms_norm(norm)
                ev._norm(norm, x)
            finally:
                hook.remove()
            assert calls == [1]
    finally:
        norm.float(), mlp.float()
