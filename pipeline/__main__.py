"""`python -m pipeline [group=option ...] [key=value ...]`: the Hydra app running SFT -> RM -> PPO.

    python -m pipeline +experiment=demo                 # offline tiny demo, CPU, minutes
    python -m pipeline                                  # DeepSpeed-Chat defaults (OPT-1.3B + OPT-350M)
    python -m pipeline +deployment=multi_node model.actor=opt-66b
    python -m pipeline 'run.stages=[sft,rm]' run.output_dir=/runs/a
    python -m pipeline --cfg job --resolve              # print the composed config
"""

from __future__ import annotations

import os
import sys

from pipeline.launchers.node_launch import adopt

adopt(sys.argv)  # a rank on another node: its overrides and variables, before any library reads them

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline import CONF_DIR  # noqa: E402
from pipeline.cli import execute, fail, one_line  # noqa: E402
from pipeline.config import ConfigError, check_command_line, register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(composed: DictConfig) -> None:
    execute(composed)


def run() -> None:
    """main(), with the errors raised before execute() runs (an override Hydra cannot use; Hydra
    creating <run>/.hydra in an unusable place) also as one line and exit 2. Hydra would print
    those itself, with a traceback; with HYDRA_FULL_ERROR=1 it re-raises them to here instead."""
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:  # unknown keys and mistyped values: one line naming the key, before Hydra composes
        sys.argv[1:] = check_command_line(sys.argv[1:])
    except ConfigError as err:
        fail(str(err))
    try:
        main()
    except CompactHydraException as err:  # Hydra's own: an override it cannot parse, a missing option
        cause = f"\n{err.__cause__}" if isinstance(err.__cause__, OmegaConfBaseException) else ""
        fail(f"{err}{cause}")
    except Exception as err:
        line = one_line(err, None)  # the run folder is not known yet
        if line is None:
            raise
        fail(line)


if __name__ == "__main__":
    run()
