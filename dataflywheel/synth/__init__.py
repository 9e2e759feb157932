"""Synthesis: generation backends, cache, Self-Instruct, Evol-Instruct: lands with its issue."""
