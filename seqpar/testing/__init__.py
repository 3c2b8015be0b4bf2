"""Models and loops shared by seqpar's tests and benchmarks (not imported by seqpar itself).

* ``seqpar.testing.models``: a zoo of small models with known chain structure, shared by
  the detection, rewrite and backend tests; every constructor returns ``(model, example_inputs)``.
* ``seqpar.testing.sampling``: denoising loops over traceable diffusers schedulers
  (``sampling_loop``); needs diffusers, imported when a loop is built.
"""
