"""Benchmarks: the measurements behind BENCHMARKS.md (`python -m bench.NAME`),
the sections of the GPU self-check `eval.gpu_check`, and the one timing
helper they share. Not part of the library; run from the repository."""
