"""Optional accelerators: faster implementations of pieces the models and the loss already have
in plain PyTorch. Each is used only where it can run (installed, a compiler found, the device at
hand) and was measured to win (``benchmarks/kernels.py`` on GPUs, ``benchmarks/cpu_kernels.py``
on CPU); the plain PyTorch code it replaces is its spec, and a test compares the two (``tests/test_cuda.py``,
``tests/models/test_kernels.py``, ``tests/models/test_cpu_attention.py``,
``tests/objectives/test_cross_entropy.py``)."""
