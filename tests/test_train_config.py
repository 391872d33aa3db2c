"""The trainer's typed config: YAML + overrides, errors that name the key, shipped configs."""

import os

import pytest

from megatron_infini.training.config import Config, ConfigError, dump_yaml, load_config
from megatron_infini.training.schedule import lr_factor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["debug", "llama-1b-infini", "llama-8b-infini"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load_and_round_trip(tmp_path, name):
    cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"))
    assert cfg.train.seq_length % cfg.model.segment_length == 0
    dump_yaml(cfg, str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_paper_settings_in_large_configs():
    one = load_config(os.path.join(REPO, "configs", "llama-1b-infini.yaml"))
    eight = load_config(os.path.join(REPO, "configs", "llama-8b-infini.yaml"))
    for cfg in (one, eight):
        assert cfg.model.segment_length == 2048 and cfg.train.global_batch_size == 64
        assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.gate_lr == 1e-2
    assert one.train.seq_length == 4096 and eight.train.seq_length == 8192
    assert eight.parallel.sequence_parallel and eight.parallel.tensor_model_parallel_size == 4


def test_presets_fit_80gb_by_the_launcher_estimate():
    from launch.memory import estimate_memory_gb

    for name, dp in [("llama-1b-infini", 8), ("llama-8b-infini", 8), ("llama-8b-infini", 16)]:
        cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"))
        gb = estimate_memory_gb(cfg.model, cfg.parallel, cfg.deepspeed.zero_stage, cfg.train.micro_batch_size,
                                cfg.train.seq_length, data_parallel_size=dp)
        assert 5 < gb < 80, (name, dp, gb)


def test_overrides_are_typed():
    cfg = load_config(None, ["train.steps=7", "optimizer.lr=1e-3", "parallel.sequence_parallel=false",
                             "logging.wandb_mode=offline", "deepspeed.extra.zero_optimization.overlap_comm=true",
                             "data.train_data=/data/x", "model.num_query_groups=null"])
    assert cfg.train.steps == 7 and cfg.optimizer.lr == 1e-3 and cfg.logging.wandb_mode == "offline"
    assert cfg.deepspeed.extra == {"zero_optimization": {"overlap_comm": True}}
    assert cfg.data.train_data == "/data/x" and cfg.model.num_query_groups is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=1"], "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
        (["trian.steps=1"], "did you mean 'train'?"),
        (["train.steps=ten"], "train.steps must be an integer"),
        (["train.steps=0"], "train.steps must be >= 1"),
        (["model.memory_update=hebbian"], "model.memory_update must be one of"),
        (["logging.wandb_mode=on"], "logging.wandb_mode must be one of"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage must be one of"),
        (["model.hidden_size=66"], "must be divisible by model.num_attention_heads"),
        (["model.num_query_groups=3"], "must be a multiple of model.num_query_groups"),
        (["parallel.tensor_model_parallel_size=4"], "must be divisible by parallel.tensor_model_parallel_size"),
        (["parallel.sequence_parallel=true"], "needs parallel.tensor_model_parallel_size > 1"),
        (["train.seq_length=100"], "must be a multiple of model.segment_length"),
        (["optimizer.min_lr=1"], "must not exceed optimizer.lr"),
        (["model.memory_layers=[3]"], "model.memory_layers must be null or a list of distinct layer numbers"),
        (["model.memory_layers=[1,1]"], "model.memory_layers must be null or a list of distinct layer numbers"),
        (["model.memory_type=xl", "model.memory_layers=[2]"], "model.memory_layers is not supported"),
        (["model.memory_write_l1=0.1"], "model.memory_write_l1 needs learned write strengths"),
        (["model.memory_write_gate=hard", "model.memory_write_l1=-1"], "model.memory_write_l1 must be >= 0"),
        (["model.memory_write_l1_start=-1"], "model.memory_write_l1_start must be >= 0"),
        (["train"], "must look like section.key=value"),
        (["train=3"], "train must be a mapping"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(REPO, "configs", "debug.yaml"), overrides)
    assert message in str(e.value)


def test_world_size_checks():
    cfg = load_config(None, ["train.global_batch_size=8", "train.micro_batch_size=2"])
    assert cfg.check_world(4) == 4
    with pytest.raises(ConfigError, match="must be divisible by train.micro_batch_size"):
        cfg.check_world(3)
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        cfg.check_world(3)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_lr_schedule_warmup_then_cosine_to_min():
    opt = Config().optimizer
    opt.lr, opt.min_lr, opt.warmup_steps = 1.0, 0.1, 10
    assert lr_factor(0, opt, 110) == pytest.approx(0.1)
    assert lr_factor(9, opt, 110) == pytest.approx(1.0)
    assert lr_factor(10, opt, 110) == pytest.approx(1.0)
    assert lr_factor(60, opt, 110) == pytest.approx(0.55)
    assert lr_factor(110, opt, 110) == pytest.approx(0.1)
    assert lr_factor(500, opt, 110) == pytest.approx(0.1)


def test_param_groups_give_gates_their_own_lr_and_no_decay():
    """Gates are found by the attribute InfiniCoreAttention sets, not by name: a router or gated
    MLP weight called "gate" is an ordinary matrix with weight decay."""
    import torch

    from megatron_infini.training.engine import param_groups

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.core_attention = torch.nn.Module()
            self.core_attention.gate = torch.nn.Parameter(torch.zeros(4))
            self.core_attention.gate.infini_gate = True
            self.proj = torch.nn.Linear(8, 8)  # weight: decay; bias: no decay
            self.norm = torch.nn.LayerNorm(8)  # no decay
            self.gate = torch.nn.Linear(8, 2, bias=False)  # e.g. a router: decay
            self.frozen = torch.nn.Parameter(torch.zeros(3, 3), requires_grad=False)

    model = Block()
    cfg = load_config(None, ["optimizer.lr=3e-4", "optimizer.gate_lr=2e-2", "optimizer.weight_decay=0.1"])
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["gates"] == {id(model.core_attention.gate)}
    assert groups["gates"]["lr"] == 2e-2 and groups["gates"]["weight_decay"] == 0.0
    assert ids["decay"] == {id(model.proj.weight), id(model.gate.weight)}
    assert groups["decay"]["lr"] == 3e-4 and groups["decay"]["weight_decay"] == 0.1
    assert ids["no_decay"] == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)}
    assert groups["no_decay"]["weight_decay"] == 0.0
    # every trainable parameter in exactly one group, the frozen one in none
    assert sum(len(s) for s in ids.values()) == sum(1 for p in model.parameters() if p.requires_grad)


def test_flops_count_memory_only_in_memory_layers():
    """model.memory_layers: the memory's FLOPs are counted once per layer that has one."""
    from megatron_infini.flops import gpt_model_flops_per_step

    shape = dict(num_layers=4, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                 vocab_size=1000, seq_length=256, batch=2, segment_length=32)
    full, off = gpt_model_flops_per_step(**shape), gpt_model_flops_per_step(**shape, memory_enabled=False)
    assert full > off
    for k in range(5):
        assert gpt_model_flops_per_step(**shape, memory_layers=k) == pytest.approx(off + k / 4 * (full - off))
