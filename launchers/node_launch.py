"""What the ranks of a multi-node run (DeepSpeed launcher + hostfile) need from the launching shell.

pdsh/ssh start each node's ranks in a bare login shell, which has none of this shell's variables
but the few DeepSpeed forwards (PYTHON*, NCCL_*, ...), and DeepSpeed pastes the command line into
that shell unquoted (a Hydra override like `x=[{a:1}]` would be brace-expanded, `$V` expanded).
So the parent writes <run>/.launch/node_launch.json (mode 600: it may hold tokens) with the
overrides, this Python's bin folder and the FORWARDED_ENV_PREFIXES variables, and passes only its
path, in LAUNCH_ENV (a PYTHON* name, so DeepSpeed forwards it). Each rank adopts it first thing
(pipeline/__main__.py), before any library reads its variables. Ranks on other hosts are not the
parent's children, so it asks them to stop through a file: <run>/.launch/stop (STOP_FILE_ENV).

Standard library only: this runs before anything else is imported.
"""

from __future__ import annotations

import json
import os

LAUNCH_ENV = "PYTHON_PIPELINE_LAUNCH"
STOP_FILE_ENV = "PIPELINE_STOP_FILE"
# Variables every node must see as the launching shell does: caches and offline switches, tokens,
# logging, thread counts, this project's switches (PIPELINE_PROGRESS, ...).
FORWARDED_ENV_PREFIXES = ("PIPELINE_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "WANDB_", "TORCH_", "PYTORCH_",
                          "GLOO_", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "VIRTUAL_ENV")


def launch_payload(overrides: list[str], env: dict, python_bin: str, stop_file: str, master: str) -> dict:
    """The launch file's content: overrides, the bin folder to put first on PATH, the variables,
    and the run's rendezvous (MASTER_ADDR:MASTER_PORT), which a rank checks before adopting it."""
    forwarded = {k: v for k, v in env.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    forwarded[STOP_FILE_ENV] = stop_file
    return {"overrides": list(overrides), "path": python_bin, "env": dict(sorted(forwarded.items())),
            "master": master}


def write_private(path: str, text: str) -> None:
    """Write `text` to `path` readable by its owner only, atomically (never briefly world-readable,
    never through a link planted at `path`)."""
    from pipeline.files import atomic_write

    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    atomic_write(path, text, private=True)


def adopt(argv: list[str], environ: os._Environ | dict = os.environ) -> bool:
    """In a rank started with LAUNCH_ENV set: take the launch file's variables (the launching
    shell's values win), put its bin folder first on PATH and, when the command line carries no
    overrides, append the file's. LAUNCH_ENV is taken out of the environment (processes this one
    starts must not adopt it again); a file of another run (its rendezvous differs) is ignored.
    True when a launch file was adopted."""
    path = environ.pop(LAUNCH_ENV, None)
    if not path or "RANK" not in environ:
        return False
    try:
        with open(path) as fh:
            launch = json.load(fh)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {LAUNCH_ENV}={path}: cannot read this multi-node run's launch file ({err}); the run "
                         "folder (run.output_dir) must be on a file system every host of the hostfile sees") from None
    if launch.get("master") != f"{environ.get('MASTER_ADDR')}:{environ.get('MASTER_PORT')}":
        return False
    environ.update(launch["env"])
    environ["PATH"] = os.pathsep.join([launch["path"], environ.get("PATH", "")])
    if len(argv) == 1:
        argv.extend(launch["overrides"])
    return True


def stop_file_present(environ: os._Environ | dict = os.environ) -> bool:
    """Whether the parent of a multi-node run asked the ranks to checkpoint and stop."""
    path = environ.get(STOP_FILE_ENV)
    return bool(path) and os.path.exists(path)
