"""The benchmarks: one script per question (see ``benchmarks/README.md``); results in ``RESULTS.md``.

Shared helpers are in :mod:`benchmarks.common`; the predictor benchmarks' model and timer helpers in
:mod:`benchmarks._serving_bench`; the end-to-end benchmark's parts in :mod:`benchmarks.e2e`.
"""
