"""Benchmarks of s2ft-lightning: `train` suite (train_suite), target checks and files (report), plots."""
