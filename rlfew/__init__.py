"""rlfew: RL post-training for few-step image generators."""

__version__ = "0.1.0"
