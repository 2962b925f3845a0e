from mixfast.methods.moco import MoCo, QueryEncoder, build_moco

__all__ = ["MoCo", "QueryEncoder", "build_moco"]
