"""Tests of refquant.perplexity (the GPTQ-lineage PPL formula) and refquant.progress."""
from __future__ import annotations

import io
import math
import sys

import numpy as np
import pytest

from refquant.spec import progress as progress_mod
from refquant.spec.perplexity import (
    PerplexityResult,
    cross_entropy,
    perplexity,
    perplexity_from_losses,
    window_loss,
    windows,
)

# ------------------------------------------------------------------------------------------
# windows


def test_windows_drop_tail_and_cap():
    tokens = np.arange(23, dtype=np.int64)
    w = windows(tokens, 5)
    assert w.shape == (4, 5)
    np.testing.assert_array_equal(w[1], [5, 6, 7, 8, 9])
    assert np.shares_memory(w, tokens)  # a view, not a copy
    assert windows(tokens, 5, max_windows=2).shape == (2, 5)
    assert windows(tokens, 5, max_windows=10).shape == (4, 5)
    np.testing.assert_array_equal(windows(tokens[None, :], 5), w)  # (1, N) input_ids


def test_windows_errors():
    with pytest.raises(ValueError, match="empty"):
        windows(np.array([], dtype=np.int64), 4)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(np.arange(3), 4)
    with pytest.raises(ValueError, match="seqlen"):
        windows(np.arange(10), 1)
    with pytest.raises(ValueError, match="1-D"):
        windows(np.zeros((2, 8), dtype=np.int64), 4)
    with pytest.raises(ValueError, match="integer"):
        windows(np.zeros(8), 4)
    with pytest.raises(ValueError, match="max_windows"):
        windows(np.arange(8), 4, max_windows=0)


# ------------------------------------------------------------------------------------------
# cross-entropy


def test_cross_entropy_uniform_is_log_vocab():
    V = 7
    assert cross_entropy(np.zeros((5, V)), np.array([0, 1, 2, 3, 6])) == pytest.approx(math.log(V), rel=1e-15)


def test_cross_entropy_by_hand():
    logits = np.array([[0.0, math.log(3.0)], [2.0, 2.0]])  # softmax rows: [1/4, 3/4], [1/2, 1/2]
    labels = np.array([1, 0])
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert cross_entropy(logits, labels) == pytest.approx(expected, rel=1e-14)


def test_cross_entropy_is_shift_invariant_and_stable():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 11))
    labels = rng.integers(0, 11, size=6)
    base = cross_entropy(logits, labels)
    assert cross_entropy(logits + 1e4, labels) == pytest.approx(base, rel=1e-9)
    assert cross_entropy(logits.astype(np.float16), labels) == pytest.approx(
        cross_entropy(logits.astype(np.float16).astype(np.float64), labels), rel=0)


def test_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(9, 13)) * 3
    labels = rng.integers(0, 13, size=9)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    assert cross_entropy(logits, labels) == pytest.approx(ref, rel=1e-13)


def test_cross_entropy_errors():
    with pytest.raises(ValueError, match="outside"):
        cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="-100"):
        cross_entropy(np.zeros((2, 3)), np.array([-100, 0]))
    with pytest.raises(ValueError, match="one label per"):
        cross_entropy(np.zeros((2, 3)), np.array([0]))
    with pytest.raises(ValueError, match="non-finite"):
        cross_entropy(np.array([[0.0, np.nan]]), np.array([0]))


def test_window_loss_shifts_by_one():
    V = 4
    window = np.array([0, 1, 2, 3])
    logits = np.full((4, V), -50.0)
    logits[np.arange(3), window[1:]] = 50.0  # position t predicts token t+1 almost surely
    logits[3, :] = np.nan  # the last position's logits are never used
    assert window_loss(logits, window) < 1e-40
    with pytest.raises(ValueError, match="seqlen"):
        window_loss(np.zeros((3, V)), window)


# ------------------------------------------------------------------------------------------
# the formula


def test_perplexity_from_losses_by_hand():
    assert perplexity_from_losses([1.0, 2.0], 2048) == pytest.approx(math.exp(1.5), rel=1e-15)
    assert perplexity_from_losses([math.log(50.0)] * 3, 16) == pytest.approx(50.0, rel=1e-14)
    # nll_i = L_i * seqlen and the division by n * seqlen cancel: exp(mean of window means),
    # whatever seqlen is (the original scores seqlen - 1 tokens but multiplies by seqlen)
    losses = [0.3, 2.9, 1.7]
    for seqlen in (2, 7, 2048):
        assert perplexity_from_losses(losses, seqlen) == pytest.approx(math.exp(np.mean(losses)), rel=1e-14)


def test_perplexity_from_losses_errors():
    with pytest.raises(ValueError, match="at least one window"):
        perplexity_from_losses([], 8)
    with pytest.raises(ValueError, match="window 1"):
        perplexity_from_losses([1.0, float("inf"), 2.0], 8)


def test_uniform_model_has_ppl_vocab_size():
    V = 32
    tokens = np.random.default_rng(0).integers(0, V, size=1000)

    def uniform(window):
        return window_loss(np.zeros((len(window), V)), window)

    res = perplexity(uniform, tokens, seqlen=64)
    assert isinstance(res, PerplexityResult)
    assert res.n_windows == 1000 // 64 == len(res.window_losses) and res.seqlen == 64
    assert res.ppl == pytest.approx(V, rel=1e-13)


def test_perplexity_sees_exactly_the_windows_and_drops_the_tail():
    seqlen = 8
    tokens = np.arange(2 * seqlen + 5, dtype=np.int64)
    seen = []

    def fn(window):
        assert window.dtype == np.int64 and window.shape == (seqlen,)
        seen.append(window.copy())
        window[:] = -1  # the callee gets a copy; the caller's tokens stay intact
        return float(len(seen))  # losses 1, 2

    res = perplexity(fn, tokens, seqlen=seqlen)
    assert res.n_windows == 2 and res.window_losses == [1.0, 2.0]
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(2 * seqlen))
    assert res.ppl == pytest.approx(math.exp(1.5), rel=1e-15)
    assert (tokens >= 0).all()
    assert perplexity(lambda w: 1.0, tokens, seqlen=seqlen, max_windows=1).n_windows == 1


def test_perplexity_against_direct_token_average():
    """A bigram model scored window by window equals exp(total NLL / scored tokens) here."""
    V, seqlen = 5, 16
    rng = np.random.default_rng(3)
    table = rng.normal(size=(V, V))
    tokens = rng.integers(0, V, size=5 * seqlen + 3)

    def bigram(window):
        return window_loss(table[window], window)

    res = perplexity(bigram, tokens, seqlen=seqlen)
    logp = table - np.log(np.exp(table).sum(axis=1, keepdims=True))
    total, count = 0.0, 0
    for w in range(5):
        win = tokens[w * seqlen:(w + 1) * seqlen]
        total -= logp[win[:-1], win[1:]].sum()
        count += seqlen - 1
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-12)


def test_perplexity_errors():
    with pytest.raises(ValueError, match="empty"):
        perplexity(lambda w: 1.0, [], seqlen=4)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(lambda w: 1.0, np.arange(3), seqlen=4)
    losses = iter([1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"window 1 \(tokens \[4, 8\)\)"):
        perplexity(lambda w: next(losses), np.arange(12), seqlen=4)


# ------------------------------------------------------------------------------------------
# progress


def test_progress_disabled_returns_iterable(monkeypatch):
    monkeypatch.setenv("REFQUANT_PROGRESS", "0")
    items = [1, 2, 3]
    assert progress_mod.progress(items) is items


def test_progress_default_off_when_not_a_tty(monkeypatch):
    monkeypatch.delenv("REFQUANT_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    items = [1, 2]
    assert progress_mod.progress(items) is items


def test_progress_forced_fallback_counter(monkeypatch):
    monkeypatch.setenv("REFQUANT_PROGRESS", "1")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # no tqdm: the minimal counter
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert list(progress_mod.progress(range(4), desc="ppl")) == [0, 1, 2, 3]
    assert err.getvalue().strip().splitlines()[-1] == "ppl: 4/4"
