"""mogrpo: multi-objective GRPO for safe and aligned language generation."""

__version__ = "0.1.0"
