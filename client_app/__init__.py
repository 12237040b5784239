"""Flower ClientApp of post-fl: thin glue around :mod:`post_fl.federated` (client side)."""
