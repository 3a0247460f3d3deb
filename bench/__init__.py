"""mlx-serving's benchmarks: one package, one subcommand per question, one result format.

Run from the repository root as `python -m bench <subcommand> ...`; see bench/README.md.
"""
