"""From a composed Hydra config to a finished run, turning known failures into one-line errors."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.config import ConfigError, load_config
from pipeline.data import DataError
from pipeline.models import ModelUnavailable
from pipeline.runner import fail, run_pipeline
from pipeline.training import NonFiniteLossError


def resolve_hardware(composed: DictConfig) -> DictConfig:
    """hardware=auto becomes the detected device's facts."""
    if composed.get("hardware", {}).get("name") == "auto":
        from pipeline.hardware import detect_hardware

        with open_dict(composed):
            composed.hardware = OmegaConf.merge(composed.hardware, detect_hardware())
    return composed


def execute(composed: DictConfig) -> dict | None:
    try:
        cfg = load_config(resolve_hardware(composed))
        if cfg.run.dry_run:
            from pipeline.planner import dry_run_report

            print(dry_run_report(cfg), flush=True)
            return None
        return run_pipeline(cfg)
    except (ConfigError, DataError, ModelUnavailable, NonFiniteLossError) as err:
        fail(str(err))
    return None
