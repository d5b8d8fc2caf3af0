"""tokenfactory: an open token factory."""

__version__ = "0.1.0"
