"""The specification: float64 NumPy/SciPy references (one file per method), weight formats, the NumPy
LLaMA and perplexity math. Nothing here imports torch, triton, transformers, CuPy or the layers above."""
