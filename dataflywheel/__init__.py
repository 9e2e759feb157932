"""dataflywheel: Beam pipelines for LLM SFT and preference data, a training stage, and the flywheel."""

__version__ = "0.1.0"
