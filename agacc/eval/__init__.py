"""Evaluation: tasks (passkey, needle, ppl, LongBench, SCROLLS), their official metrics, a runner
that compares presets of the same compressed cache on the same samples, and the CLI
(``python -m agacc eval ...``)."""
