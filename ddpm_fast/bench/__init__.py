"""What `ddpm-fast bench` needs: its configuration and flags (config, standard library only), interleaved timing
and result files (common), the plain-PyTorch baseline it compares against (baseline), and the sampling
benchmark itself (sampling). The scripts, pytest-benchmark suites and results live in benchmarks/."""
