from mixfast.mixing.mixmask import MaskedBatch, MixMaskMixer
from mixfast.mixing.rng import step_generator, step_numpy_rng
from mixfast.mixing.unmix import UnMixedBatch, UnMixer

__all__ = ["MaskedBatch", "MixMaskMixer", "UnMixedBatch", "UnMixer", "step_generator", "step_numpy_rng"]
