"""Choosing the result: validation loss, early stopping, overbake signals, comparison grids (issue 5)."""
