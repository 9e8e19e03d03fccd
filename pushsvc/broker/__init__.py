"""Brokers: how a node reaches the connections of other nodes (see base.py)."""
