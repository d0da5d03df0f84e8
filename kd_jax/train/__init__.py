"""Training: mesh and sharding, the jitted step, eval, checkpoints, `run`."""
from kd_jax.train.config import ConfigError, base_config, row  # noqa: F401
from kd_jax.train.loop import Preempted, NonFiniteLoss, evaluate, run  # noqa: F401
from kd_jax.train.planning import RowPlan, check, plan  # noqa: F401
