"""Small real models built in code, used by `make demo`, tests, examples and benchmarks."""
