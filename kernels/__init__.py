"""Selective scan: Triton kernels, PyTorch reference and chunked scan, dispatch, benchmarks."""
