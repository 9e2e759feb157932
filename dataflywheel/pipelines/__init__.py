"""Beam graphs that compose readers, stages and writers (plus the plain-loop engine)."""
