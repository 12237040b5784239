"""Flower ServerApp of post-fl: thin glue around :mod:`post_fl.federated` (server side)."""
