"""Bad input gets a clear error naming the key and the allowed values, before any process group starts."""
from __future__ import annotations

import pytest

from memtrain import ConfigError, MemTrainConfig
from memtrain.sharding import check_launched_world, plan_mesh
from memtrain.sharding.wrap import find_blocks
from tests.parity import tiny_gpt


@pytest.mark.parametrize(
    "data, message",
    [
        ({"sharding": {"stage": 4}}, "sharding.stage=4 is not valid: choose one of [0, 1, 2, 3]"),
        ({"sharding": {"stage": "3"}}, "sharding.stage='3'"),
        ({"sharding": {"stages": 3}}, "unknown key(s) ['sharding.stages']"),
        ({"shardin": {}}, "unknown config section(s) ['shardin']"),
        ({"sharding": {"hybrid": True, "stage": 1}}, "use stage 2 or 3"),
        ({"sharding": {"shard_size": 2}}, "only meaningful with sharding.hybrid=true"),
        ({"sharding": {"wrap": "blocks"}}, "sharding.wrap='blocks'"),
        ({"sharding": {"param_dtype": "fp8"}}, "sharding.param_dtype='fp8'"),
        ({"sharding": 3}, "sharding must be a mapping"),
    ],
)
def test_bad_settings_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        MemTrainConfig.from_dict(data)
    assert message in str(err.value)


def test_hybrid_mesh_must_divide_world() -> None:
    sharding = MemTrainConfig.from_dict({"sharding": {"stage": 3, "hybrid": True, "shard_size": 3}}).sharding
    with pytest.raises(ConfigError, match="shard_size=3 does not divide the world size 4"):
        plan_mesh(sharding, world_size=4, local_world_size=2)
    hybrid = MemTrainConfig.from_dict({"sharding": {"stage": 3, "hybrid": True}}).sharding
    assert plan_mesh(hybrid, world_size=8, local_world_size=4).shape == (2, 4)
    with pytest.raises(ConfigError, match="leaves nothing to replicate"):
        plan_mesh(hybrid, world_size=4, local_world_size=4)


def test_devices_must_match_torchrun() -> None:
    env = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    check_launched_world(devices=2, num_nodes=2, env=env)
    with pytest.raises(ConfigError, match="devices=4 but torchrun started 2 processes per node"):
        check_launched_world(devices=4, num_nodes=1, env=env)
    with pytest.raises(ConfigError, match="num_nodes=1 but torchrun started 2 node"):
        check_launched_world(devices=2, num_nodes=1, env=env)


def test_devices_must_match_srun() -> None:
    env = {"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NAME": "train"}
    check_launched_world(devices=4, num_nodes=2, env=env)
    with pytest.raises(ConfigError, match="devices=8 but srun started 4 processes per node"):
        check_launched_world(devices=8, num_nodes=1, env=env)


def test_wrap_names_must_exist() -> None:
    model = tiny_gpt()
    assert [type(b).__name__ for b in find_blocks(model, "auto")] == ["Block", "Block"]
    assert len(find_blocks(model, ("Block",))) == 2
    with pytest.raises(ConfigError, match=r"sharding.wrap names \['DecoderLayer'\]"):
        find_blocks(model, ("DecoderLayer",))


def test_hugging_face_no_split_modules_are_used() -> None:
    model = tiny_gpt()
    model._no_split_modules = ["MLP"]
    assert [type(b).__name__ for b in find_blocks(model, "auto")] == ["MLP", "MLP"]
