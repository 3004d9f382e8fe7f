"""Test helpers for the layer-wise pipeline: layer inputs of a NumPy LLaMA, a crash-and-resume run."""
from __future__ import annotations

import pytest

from refquant import pipeline, runs


def layer_inputs(model, ids, upto):
    """Inputs of layer ``upto`` through ``model``'s layers before it (as they are now: FP or already
    quantized), one calibration sequence at a time, as the pipeline computes them."""
    runner = pipeline.NumpyRunner(model)
    h = runner.embed(ids)
    for i in range(upto):
        h = runner.forward(model.layers[i], h)
    return h


class Crash(RuntimeError):
    pass


def quantize_run(cfg, ids, out, resume=False):
    """``runs.quantize`` of the tiny model (torch, CPU, float32) into ``out``; returns the loaded model."""
    loaded = runs.load(runs.DEFAULT_MODEL, "torch", "cpu", "float32")
    runs.quantize(loaded, cfg, ids, out_dir=out, resume=resume, run_info={"ids": "test"}, batch_size=2)
    return loaded


def crash_then_resume(cfg, ids, out, crash_after: int):
    """Quantize into ``out``, dying right after layer ``crash_after`` is written, then resume the run
    on a freshly loaded model; returns the resumed run's loaded model."""
    original = runs.LayerStore.write

    def write(self, record, layer, runner):
        original(self, record, layer, runner)
        if record.index == crash_after:
            raise Crash(f"injected crash after layer {crash_after}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs.LayerStore, "write", write)
        with pytest.raises(Crash):
            quantize_run(cfg, ids, out)
    return quantize_run(cfg, ids, out, resume=True)
