"""Simulation helpers for post-fl: in-process Grid, Flower simulation runner, scaling benchmark."""
