"""Curation stages: each module registers its stages (see registry.BUILTIN_MODULES)."""
