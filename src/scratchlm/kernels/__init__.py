"""Optional accelerators: faster implementations of pieces the models already have in plain
PyTorch. Each is used only where it is installed, runs on the device at hand and was measured to
win (``benchmarks/kernels.py``); the plain PyTorch code it replaces is its spec, and a test compares
the two (``tests/test_cuda.py``)."""
