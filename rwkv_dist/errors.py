"""Errors raised for bad user input. Each carries one line that names the file, field or value at fault."""


class RWKVDistError(Exception):
    """Base class: bad input caught before any expensive work."""


class ShapeError(RWKVDistError, ValueError):
    """A tensor with the wrong shape, dtype or device."""


class ConfigError(RWKVDistError, ValueError):
    """A config file or field that is missing, unknown or invalid."""


class CheckpointError(RWKVDistError, ValueError):
    """A state dict or checkpoint that does not fit the model (missing, extra or mis-shaped keys; unreadable file)."""


class DataError(RWKVDistError, ValueError):
    """A corpus, tokenizer, shard or manifest problem (named file and line/field)."""


class KernelBuildError(RWKVDistError, RuntimeError):
    """The C++ kernels in csrc/ could not be compiled here (no compiler, or it failed): names the compiler and its error."""
