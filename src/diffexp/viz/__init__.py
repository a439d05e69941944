"""Plots, grids and animations for notebooks, callbacks and the CLI."""
