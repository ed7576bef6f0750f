"""bertfast's benchmarks: kernel benchmarks (bench_<op>.py), the whole encoder (bench_model.py), and the suite
that runs them all per device (suite.py; `bertfast bench` or `python -m benchmarks`)."""
