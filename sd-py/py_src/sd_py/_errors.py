"""Exceptions and build facts of the native module."""

from ._sd_py import GenerationCancelled, cuda_is_available

__all__ = ["GenerationCancelled", "cuda_is_available"]
