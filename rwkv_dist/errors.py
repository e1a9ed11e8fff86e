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


def check_out_folder(path, what: str, error: type[RWKVDistError] = RWKVDistError) -> None:
    """Refuse, before any work, an output folder that cannot be made: it or a folder above it is a file, or the
    nearest existing one is not writable. Otherwise mkdir fails deep inside the work with a traceback (or after
    hours of tokenizing). `what` names the argument or field, e.g. "--out"."""
    import os
    from pathlib import Path

    path = Path(path)
    for p in (path, *path.absolute().parents):
        if p.exists():
            if not p.is_dir():
                raise error(f"{what}: {p} exists and is not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise error(f"{what}: {p} is not writable")
            return
