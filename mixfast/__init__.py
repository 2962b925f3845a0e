"""mixfast: fast, faithful self-supervised pretraining with image mixtures and masks."""

from mixfast import _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"
