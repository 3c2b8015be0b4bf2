"""Tests of the runtime: solve_chain, PCR, Newton and damping, the compiled CPU loops, Triton, custom ops, the rolled form."""
