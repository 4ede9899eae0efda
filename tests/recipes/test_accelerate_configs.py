"""The shipped accelerate configurations load with accelerate's own config loader."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "accelerate_configs"


@pytest.mark.parametrize(
    "name, distributed_type, machines",
    [("single_gpu", "NO", 1), ("multi_gpu", "MULTI_GPU", 1), ("multi_node", "MULTI_GPU", 2), ("fsdp", "FSDP", 1)],
)
def test_configs_load(name, distributed_type, machines):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert str(config.distributed_type).endswith(distributed_type)
    assert config.num_machines == machines
