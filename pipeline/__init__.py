"""rlhf-pipeline: SFT -> reward model -> PPO on DeepSpeed, composed with Hydra.

`python -m pipeline` runs the stages; `pipeline.rlhf` is the Python API (RLHFEngine, PPOTrainer).
"""

from pathlib import Path

# The Hydra config groups: conf/ at the top of a source checkout, pipeline/conf inside a wheel.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).resolve().parent.parent / "conf"
