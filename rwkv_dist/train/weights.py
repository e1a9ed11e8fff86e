"""Full fp32 weights out of a training checkpoint, for export, generation and evaluation.

zero3: the fp32 master partitions of every rank are stitched back together (DeepSpeed's consolidation).
pipeline / tensor parallel: the same for each (stage, tensor rank), tensor slices joined along their split.
ddp:   the replicated module; in bf16 runs the fp32 master copies kept by the optimizer replace its bf16 weights.
Every pickle is checked weights-only first (checkpoint.check_pickles), so this never runs code from the files.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..config import RunConfig, validate
from ..errors import CheckpointError
from .checkpoint import check_pickles, find_checkpoint, load_checked


def checkpoint_config(folder: Path) -> RunConfig:
    path = folder / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: unreadable run config ({e})") from None
    return validate(RunConfig, data, str(path))


def checkpoint_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], RunConfig, Path]:
    """(fp32 state dict with BlinkDL names, the run config, the committed folder) of a step folder or run folder."""
    folder = find_checkpoint(path)
    cfg = checkpoint_config(folder)
    check_pickles(folder)
    if cfg.parallel.strategy == "pipeline" or cfg.parallel.tensor > 1:
        sd = _model_parallel_weights(folder, cfg)
    elif cfg.parallel.strategy == "zero3":
        sd = _zero3_weights(folder)
    else:
        sd = _replicated_weights(folder, cfg)
    return {k: v.float().contiguous() for k, v in sd.items()}, cfg, folder


def _zero3_weights(folder: Path) -> dict[str, torch.Tensor]:
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # DeepSpeed narrates each file and draws progress bars
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def _model_parallel_weights(folder: Path, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Each (stage, tensor rank) writes files under its model-parallel rank mp_rank_MM, MM = stage * T + t. DeepSpeed's
    consolidation reads one such rank at a time, so each is presented to it alone, under rank 00, in a scratch folder
    of links; the tensor ranks' slices are then joined along the dimension they were split on."""
    import tempfile

    T = cfg.parallel.tensor
    sd: dict[str, torch.Tensor] = {}
    for stage in range(cfg.pipeline_stages):
        slices = []
        for t in range(T):
            mp = stage * T + t
            mine = sorted(folder.glob(f"*mp_rank_{mp:02d}_*.pt"))
            if not mine:
                raise CheckpointError(f"{folder}: no files of pipeline stage {stage}, tensor rank {t} (mp_rank_{mp:02d})")
            with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
                view = Path(tmp) / folder.name
                view.mkdir()
                for f in mine:
                    (view / f.name.replace(f"mp_rank_{mp:02d}_", "mp_rank_00_")).symlink_to(f.resolve())
                slices.append(_zero3_weights(view))
        part = slices[0] if T == 1 else _join_tensor_slices(slices)
        if set(part) & set(sd):
            raise CheckpointError(f"{folder}: stage {stage} repeats parameters of an earlier stage")
        sd.update(part)
    return sd


def _join_tensor_slices(slices: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    from ..parallel.tensor import partition_dim

    joined = {}
    for name, first in slices[0].items():
        dim = partition_dim(name)
        joined[name] = first if dim is None else torch.cat([s[name] for s in slices], dim=dim)
    return joined


def _replicated_weights(folder: Path, cfg: RunConfig) -> dict[str, torch.Tensor]:
    from ..model import RWKV
    from .optim import param_groups

    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{folder}: no mp_rank_*_model_states.pt (not a ddp checkpoint?)")
    state = load_checked(files[0])
    sd = dict(state["module"])
    masters = (state.get("optimizer") or {}).get("fp32_groups")
    if masters:  # bf16: the optimizer's fp32 copies, group by group in param_groups() order
        with torch.device("meta"):
            model = RWKV(cfg.model, init=False)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [[names[id(p)] for p in g["params"]] for g in param_groups(model, cfg.optimizer)]
        if [len(g) for g in groups] != [len(g) for g in masters]:
            raise CheckpointError(f"{files[0]}: optimizer groups do not match the model's")
        for group, tensors in zip(groups, masters):
            sd.update(zip(group, tensors))
    return sd
