"""The scale rehearsal's rows (issue 17): ``common`` (node, workload constants, Row, measuring helpers),
``rows_data`` (prepare, teacher cache, stage 1, read-out, encoding) and ``rows_models`` (stage 2, stage 3).
Driven by ``benchmarks/bench_scale.py``."""
