"""`python -m pipeline [group=option ...] [key=value ...]`: the Hydra app running SFT -> RM -> PPO.

    python -m pipeline +experiment=demo                 # offline tiny demo, CPU, minutes
    python -m pipeline                                  # DeepSpeed-Chat defaults (OPT-1.3B + OPT-350M)
    python -m pipeline +deployment=multi_node model.actor=opt-66b
    python -m pipeline run.stages=[sft,rm] run.output_dir=/runs/a
    python -m pipeline --cfg job --resolve              # print the composed config
"""

from __future__ import annotations

import sys

from pipeline.launchers.node_launch import adopt

adopt(sys.argv)  # a rank on another node: its overrides and variables, before any library reads them

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline import CONF_DIR  # noqa: E402
from pipeline.config import register_resolvers  # noqa: E402
from pipeline.cli import execute  # noqa: E402

register_resolvers()


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(composed: DictConfig) -> None:
    execute(composed)


if __name__ == "__main__":
    main()
