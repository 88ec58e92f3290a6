"""What users run: the CLI, evaluation, benchmarks, peers, the compiled runtime."""
