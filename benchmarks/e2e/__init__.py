"""The end-to-end benchmark behind ``benchmarks/e2e_throughput.py`` (the entry point: options and main).

* :mod:`~benchmarks.e2e.runner`: the broker, the input topics and the phases (pass-through, pipeline
  from a backlog, rate runs);
* :mod:`~benchmarks.e2e.worker`: the ``faust worker`` subprocess and its profiler;
* :mod:`~benchmarks.e2e.measure`: reading the outputs back, CPU, percentiles, the worker's metrics;
* :mod:`~benchmarks.e2e.report`: the markdown block and its section of ``benchmarks/RESULTS.md``.
"""
