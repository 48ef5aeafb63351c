"""Bounces: the rules that decide which failures suppress an address."""
