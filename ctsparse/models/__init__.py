"""Models: a registry, the sparse residual classifier and its dense twin."""

from ctsparse.models.registry import create_model

__all__ = ["create_model"]
