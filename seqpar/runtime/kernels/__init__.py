"""The runtime's compiled kernels: the CPU substitution kernel (``cpu_scan``, C built at first use) and the
Triton kernel for CUDA tensors (``triton_pcr``; imported only where CUDA tensors are)."""
