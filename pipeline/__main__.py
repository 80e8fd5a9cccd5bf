"""`python -m pipeline [group=option ...] [key=value ...]`: the Hydra app running SFT -> RM -> PPO.

    python -m pipeline +experiment=demo                 # offline tiny demo, CPU, minutes
    python -m pipeline                                  # DeepSpeed-Chat defaults (OPT-1.3B + OPT-350M)
    python -m pipeline +deployment=multi_node model.actor=opt-66b
    python -m pipeline run.stages=[sft,rm] run.output_dir=/runs/a
    python -m pipeline --cfg job --resolve              # print the composed config
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.launchers.node_launch import adopt

adopt(sys.argv)  # a rank on another node: its overrides and variables, before any library reads them

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline import CONF_DIR  # noqa: E402
from pipeline.config import register_resolvers  # noqa: E402
from pipeline.cli import DEBUG_ENV, execute, fail, one_line  # noqa: E402

register_resolvers()


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(composed: DictConfig) -> None:
    execute(composed)


def hydra_run_folder() -> Path | None:
    """The run folder of a single run whose Hydra output folder (hydra.run.dir, <run>/.hydra) failed."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return None
    return Path(os.path.abspath(HydraConfig.get().run.dir)).parent


def run() -> None:
    """main(), with the errors raised before execute() runs (a bad override; Hydra creating
    <run>/.hydra in an unusable place) also as one line and exit 2. Hydra prints those itself, with
    a traceback, unless HYDRA_FULL_ERROR=1, when it re-raises them: so it is set here."""
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CompactHydraException as err:  # Hydra's own: an override it cannot parse, a missing option
        if debug:
            raise
        cause = f"\n{err.__cause__}" if isinstance(err.__cause__, OmegaConfBaseException) else ""
        fail(f"{err}{cause}")
    except Exception as err:  # noqa: BLE001 - only the foreseen ones become one line
        line = one_line(err, hydra_run_folder())
        if line is None or debug:
            raise
        fail(line)


if __name__ == "__main__":
    run()
