"""``fw bench``: a matrix of methods x seeds on one recipe, measured on the dimensions the PEFT
literature compares, each run in its own process (runner.py), with per-checkpoint inference
latency (latency.py), aggregated into results.json, results.md and plots (report.py)."""
