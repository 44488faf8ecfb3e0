"""Engines: one module per library behind one small interface (base.Engine). See base.py."""
from mechscope.engines.base import BACKENDS, Edit, Engine, FinalNorm, ModelConfig, layer_of

__all__ = ["BACKENDS", "Edit", "Engine", "FinalNorm", "ModelConfig", "layer_of"]
