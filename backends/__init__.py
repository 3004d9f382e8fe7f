"""GPU backends of refquant (filled by the GPU-backend work); see backends/README in docs."""
