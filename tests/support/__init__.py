"""The test harness: real node processes, real peers and senders, generated and broken
DICOM, tiny models, the validators. The tests and the benchmarks (``bench/``) share it;
the project installs it as ``tests.support``, so a benchmark run as a script finds it."""
