"""The dynamic provider steps: one module each, every step acting on a map of hosts in one call."""
