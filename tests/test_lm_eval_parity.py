"""lm-eval 0.4 with local task configs against refquant's evaluator on the tiny model (slow).

``tools/lm_eval_parity.py`` writes the local documents in the Hugging Face layout and task YAMLs
that include lm-eval's shipped ones (no hub). Checked: lm-eval's request strings equal refquant's
for every document of the five tasks, the tokens agree, and the per-request log-likelihoods of
lm-eval's ``hf`` model (``add_bos_token=False``, float32) and of the ``refquant`` lm-eval model
equal refquant's evaluator. See docs/evaluation.md.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("datasets")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import lm_eval_parity  # noqa: E402

from refquant import evaluate as ev  # noqa: E402


@pytest.fixture(scope="module")
def shared() -> Path:
    env = os.environ.get("REFQUANT_DATA_DIR", "")
    if not env.strip() or not (Path(env) / "piqa").is_dir():
        pytest.skip("REFQUANT_DATA_DIR is not set to ../shared/data.")
    return Path(env)


@pytest.mark.slow
def test_lm_eval_parity(shared, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = lm_eval_parity.write_local_tasks(tmp_path / "tasks", shared)
    ours = {task: ev.load_docs(task, shared) for task in lm_eval_parity.LM_EVAL_TASKS}
    strings = lm_eval_parity.compare_strings(ours, lm_eval_parity.lm_eval_requests(names, tmp_path / "tasks"))
    for task, r in strings.items():
        assert r["documents"] == r["lm_eval_documents"], task
        assert r["differing"] == [], (task, r["differing"][:3])
    tokens = lm_eval_parity.compare_tokens(ev.load_tokenizer(lm_eval_parity.TINY), ours)
    assert sum(r["requests"] for r in tokens.values()) == 60566  # the study's request count
    assert all(r["differing"] == 0 for r in tokens.values()), tokens
    lls = lm_eval_parity.loglikelihood_parity(names, tmp_path / "tasks", 10, shared)
    for task, r in lls.items():
        for model in ("hf", "refquant"):
            assert r[model]["missing"] == 0 and r[model]["requests"] >= 20, (task, model, r)
            assert r[model]["max_abs_delta"] <= 1e-4, (task, model, r)
            assert r[model]["acc"] == pytest.approx(r["refquant_evaluator_acc"]), (task, model, r)
