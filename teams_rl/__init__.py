"""teams_rl: reproduce and extend TeaMs-RL (arXiv 2403.08694) as Hydra-configured, cached stages."""

__version__ = "0.1.0"
