"""mechscope: vetted mechanistic-interpretability techniques, a bundled toy model, and an agent skill pack."""
__version__ = "0.1.0"
