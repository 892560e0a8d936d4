"""Reward models and rule rewards (DESIGN §4). Placeholder until the rewards issue lands."""
