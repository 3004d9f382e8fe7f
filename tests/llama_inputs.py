"""Test helper: the inputs of one decoder layer of a NumPy LLaMA (``refquant.llama``)."""
from __future__ import annotations

from refquant import pipeline


def layer_inputs(model, ids, upto):
    """Inputs of layer ``upto`` through ``model``'s layers before it (as they are now: FP or already
    quantized), one calibration sequence at a time, as the pipeline computes them."""
    runner = pipeline.NumpyRunner(model)
    h = runner.embed(ids)
    for i in range(upto):
        h = runner.forward(model.layers[i], h)
    return h
