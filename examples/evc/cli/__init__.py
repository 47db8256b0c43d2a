"""The ``evc`` command line, one module per group of commands, and its tools: image I/O, the benchmark, the
markdown tables of its results, the reduced-precision study, the stream fuzzer and the end-to-end demo."""
