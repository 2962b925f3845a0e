"""Siamese frameworks (one module each) behind one interface, `base.Method`."""

from mixfast.methods.base import Method, StepResult, build_method, registered
from mixfast.methods.encoders import PredictorEncoder, QueryEncoder
from mixfast.methods.moco import MoCo, build_moco

__all__ = ["Method", "StepResult", "build_method", "registered", "PredictorEncoder", "QueryEncoder", "MoCo",
           "build_moco"]
