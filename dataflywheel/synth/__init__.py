"""Synthesis: generation backends, cache, Self-Instruct, Evol-Instruct: docs/synthesis.md."""
