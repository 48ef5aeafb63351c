"""Delivery: the pool of connections for one destination and its throttle."""
