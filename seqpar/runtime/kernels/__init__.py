"""The runtime's compiled kernels: the CPU substitution kernel (``cpu_scan``, C built at first use) and the
Triton kernels for CUDA tensors (``triton_pcr``, ``triton_newton``; imported only where CUDA tensors are)."""
