"""The speed layer: compiled kernels, quantization, expert offload and huge pages."""
