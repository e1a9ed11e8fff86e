"""Training checkpoints: DeepSpeed engine state + trainer state, committed atomically, newest complete one resumed.

    OUT/checkpoints/
      step_00000200/            committed: the DeepSpeed engine files (model, ZeRO shards, optimizer), plus
        trainer/rank_00000.json   per rank: step, tokens, counters, data-stream positions
        trainer/rank_00000.rng.safetensors   per rank: RNG states (no pickle)
        config.yaml, tokenizer.model, COMPLETE.json
      step_00000300.partial/    being written (or left by a crash): never resumed from, removed by the next save
      latest                    name of the newest committed step (informational; resume scans for COMPLETE.json)
      universal/step_00000200/  a world-size-free copy (DeepSpeed's universal checkpoint), made when a zero3 run
                                resumes on another number of ranks; removed by the next commit

Commit protocol: every rank writes into `step_N.partial/`; after a barrier rank 0 writes COMPLETE.json, renames the
folder to `step_N` (one atomic rename) and updates `latest`; then old checkpoints beyond `keep_last` are removed. A crash at
any point leaves the previous committed checkpoint untouched.

DeepSpeed reads its own files with pickle. Before handing a checkpoint to DeepSpeed (resume, export) every pickle it
will read is opened with torch's weights-only unpickler, which executes nothing and admits only tensors, containers and
the DeepSpeed enums listed below; anything else is refused with the file named. On a resume each rank checks only the
files it loads itself (its own ZeRO partition and the shared ones), not every rank's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.state_dict import describe_load_failure

STEP_PREFIX = "step_"
PARTIAL = ".partial"
COMPLETE = "COMPLETE.json"
LATEST = "latest"
UNIVERSAL = "universal"
FORMAT = "rwkv_dist.checkpoint/1"
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")
_MP_FILE = re.compile(r"mp_rank_(\d+)_")


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_checkpoint(path: Path) -> bool:
    return (path / COMPLETE).is_file()


class CheckpointStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def committed(self) -> list[Path]:
        """Committed step folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and p.name.startswith(STEP_PREFIX) and not p.name.endswith(PARTIAL) and is_checkpoint(p)]
        return sorted(found, key=lambda p: p.name)

    def resolve(self, spec: str) -> Path | None:
        """`auto`: the newest committed checkpoint (None if there is none); `none`: None; else a committed step folder."""
        if spec == "none":
            return None
        if spec == "auto":
            found = self.committed()
            path = found[-1] if found else None
        else:
            path = Path(spec)
            if not path.is_dir():
                raise CheckpointError(f"checkpoint.resume: {spec}: no such checkpoint folder")
            if not is_checkpoint(path):
                raise CheckpointError(f"checkpoint.resume: {spec}: not a committed checkpoint (no {COMPLETE}; "
                                      f"an interrupted save?)")
        if path is not None:
            read_saved_config(path)  # the trainer compares it with the run's: a damaged one is named here, in one line
        return path

    # -- saving (called on every rank) -------------------------------------------------------------------------------
    def begin(self, step: int, is_main: bool) -> tuple[str, Path]:
        """The DeepSpeed tag and folder to write step `step` into. Rank 0 clears leftovers of interrupted saves."""
        tag = step_name(step) + PARTIAL
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for old in self.root.glob(f"{STEP_PREFIX}*{PARTIAL}"):
                shutil.rmtree(old, ignore_errors=True)
        return tag, self.root / tag

    @staticmethod
    def write_rank_state(folder: Path, rank: int, state: dict, rng: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        sub = folder / "trainer"
        sub.mkdir(parents=True, exist_ok=True)
        write_atomic(sub / f"rank_{rank:05d}.json", json.dumps(state))
        save_file(rng, str(sub / f"rank_{rank:05d}.rng.safetensors"))

    def commit(self, folder: Path, step: int, world_size: int, config_yaml: str, tokenizer: bytes, keep_last: int) -> Path:
        """Rank 0, after every rank finished writing: mark complete, rename into place, point `latest`, prune."""
        write_atomic(folder / "config.yaml", config_yaml)
        write_atomic(folder / "tokenizer.model", tokenizer)
        missing = [r for r in range(world_size) if not (folder / "trainer" / f"rank_{r:05d}.json").is_file()]
        if missing:
            raise CheckpointError(f"{folder}: ranks {missing} wrote no trainer state; not committing")
        write_atomic(folder / COMPLETE, json.dumps({"format": FORMAT, "step": step, "world_size": world_size,
                                                    "time": time.time()}))
        final = self.root / step_name(step)
        if final.exists():  # a rollback re-saving a step it had saved before
            shutil.rmtree(final)
        os.rename(folder, final)
        write_atomic(self.root / LATEST, final.name + "\n")
        shutil.rmtree(self.root / UNIVERSAL, ignore_errors=True)  # a conversion for a resume that is now behind us
        for old in self.committed()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final


# -- reading -----------------------------------------------------------------------------------------------------------


def read_rank_states(folder: Path) -> list[dict]:
    meta = read_complete(folder)
    states = []
    for r in range(meta["world_size"]):
        path = folder / "trainer" / f"rank_{r:05d}.json"
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable trainer state ({e})") from None
    return states


def read_rank_rng(folder: Path, rank: int) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    path = folder / "trainer" / f"rank_{rank:05d}.rng.safetensors"
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError) on a damaged file
        raise CheckpointError(f"{path}: unreadable RNG state ({type(e).__name__}: {e})") from None


def read_saved_config(folder: Path) -> dict:
    """The run config a committed checkpoint was saved with (a YAML mapping), or one CheckpointError naming it."""
    import yaml

    path = folder / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: bytes that are not UTF-8
        raise CheckpointError(f"{path}: unreadable run config ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    sections = isinstance(data, dict) and isinstance(data.get("model"), dict) and isinstance(data.get("data"), dict)
    sources = data["data"].get("sources") if sections else None
    if not (isinstance(sources, list) and all(isinstance(x, dict) for x in sources)):  # what the trainer compares
        raise CheckpointError(f"{path}: not a run config (needs model: and data.sources: sections)")
    return data


def read_complete(folder: Path) -> dict:
    try:
        meta = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: not a committed checkpoint ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / COMPLETE}: format {meta.get('format')!r}, expected {FORMAT}")
    return meta


# Non-tensor types DeepSpeed puts in its checkpoint pickles: plain enums and records whose unpickling runs no code of
# theirs (no __reduce__ / __setstate__ beyond the default).
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
)


def _deepspeed_safe_globals() -> list:
    import importlib

    allowed = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # pragma: no cover - depends on the DeepSpeed version
            pass
    return allowed


def load_checked(path: Path):
    """torch.load with the weights-only unpickler and the DeepSpeed allowlist."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def pickle_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.pt")) + sorted(folder.rglob("*.pth"))


def rank_files(folder: Path, dp_rank: int, mp_rank: int = 0) -> list[Path]:
    """The pickles DeepSpeed opens on one rank when it loads `folder`: the shared files of its model-parallel rank
    (a pipeline stage) and its own ZeRO partition (`zero_pp_rank_{dp}_mp_rank_{mp}_...`), not those of other ranks."""
    files = []
    for path in pickle_files(folder):
        dp, mp = _RANK_FILE.search(path.name), _MP_FILE.search(path.name)
        if (dp is None or int(dp.group(1)) == dp_rank) and (mp is None or int(mp.group(1)) == mp_rank):
            files.append(path)
    return files


def check_pickles(folder: Path, files: list[Path] | None = None) -> None:
    """Open every pickle under `folder` (or just `files`) with the weights-only unpickler; raise naming the first that
    needs more."""
    files = pickle_files(folder) if files is None else files
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for path in files:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any refusal is the same user-facing problem
                raise CheckpointError(f"{path}: {describe_load_failure(e)}") from None


def find_checkpoint(path: str | Path) -> Path:
    """A committed step folder, given it or a run folder / checkpoints folder (then the newest committed one)."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    for root in (path / "checkpoints", path):
        found = CheckpointStore(root).committed()
        if found:
            return found[-1]
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    raise CheckpointError(f"{path}: no committed checkpoint in it")


def universal_checkpoint(folder: Path, root: Path) -> Path:
    """A DeepSpeed universal checkpoint of the committed ZeRO-3 `folder` at root/<step name> (made once, atomically),
    which an engine of any data-parallel size loads with `checkpoint.load_universal`: each parameter's fp32 master and
    Adam moments whole, re-sharded on load."""
    out = root / folder.name
    if (out / COMPLETE).is_file():
        return out
    check_pickles(folder)  # the conversion unpickles every rank's files
    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    partial = root / (folder.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    args = type("Args", (), dict(input_folder=str(folder), output_folder=str(partial), num_extract_workers=1,
                                 num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
    chatter = io.StringIO()  # DeepSpeed narrates every stage
    with contextlib.redirect_stdout(chatter):
        to_universal(args)
    write_atomic(partial / COMPLETE, json.dumps({"format": FORMAT, "universal_of": folder.name, "time": time.time()}))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(partial, out)
    return out
