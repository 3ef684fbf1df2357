"""The training run: preparation (all checks before GPU time), the loop, and what it writes."""
