"""varup — reproducibility pipeline for 'Uncertainty Preservation in Generative Visual Autoregression'."""
__version__ = "0.1.0"
