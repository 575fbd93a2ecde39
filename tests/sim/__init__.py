"""Deterministic simulations of the pure protocol rules (seeded schedules, checked invariants)."""
