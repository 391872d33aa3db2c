"""The trainer's typed configuration: dataclasses are the source of truth.

YAML files only serialise these dataclasses and the command line only overrides fields
(`train.steps=100 model.memory_update=delta`). Unknown keys, wrong types and bad values raise
`ConfigError` (a ValueError) naming the key, with a close match when there is one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .config_checks import ConfigError, _at_least, _one_of  # noqa: F401 (ConfigError: public here)
from .model_config import ModelConfig  # noqa: F401 (public here: the model section)


@dataclass
class ParallelConfig:
    """Megatron-core model parallelism; data parallelism takes the remaining ranks."""

    tensor_model_parallel_size: int = 1
    """Ranks that split every layer's heads and MLP."""
    sequence_parallel: bool = False
    """Split norms and dropout along the sequence over the tensor-parallel ranks."""
    context_parallel_size: int = 1
    """Ranks that split every sequence into contiguous blocks of whole segments; the Infini memory
    is handed from rank to rank (megatron_infini.parallel), not the keys and values."""
    timeout_minutes: float = 10.0
    """Collective timeout: a rank that dies makes the others fail after this long, never hang."""

    def validate(self, prefix: str = "parallel") -> None:
        _at_least(f"{prefix}.tensor_model_parallel_size", self.tensor_model_parallel_size, 1)
        _at_least(f"{prefix}.context_parallel_size", self.context_parallel_size, 1)
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError(f"{prefix}.sequence_parallel needs {prefix}.tensor_model_parallel_size > 1")


@dataclass
class DataConfig:
    """Tokenized training data (see tools/preprocess_data.py)."""

    train_data: Any = ""
    """Prefix of the preprocessed training data (.bin/.idx); empty: the corpus shipped with the package.
    Or a blend, Megatron's weighted list `[0.7, prefix_a, 0.3, prefix_b]` (YAML list, or the text
    "0.7 prefix_a 0.3 prefix_b"): each sample comes from one corpus, in shares equal to the
    normalised weights, deterministically (megatron_infini.data.blend)."""
    valid_data: Any = ""
    """Prefix (or weighted list, as train_data) of preprocessed validation data; empty: the shipped
    validation play when train_data is empty too, else no validation."""
    train_loss_weights: str = ""
    """Prefix of per-token loss weights aligned with train_data (an indexed dataset with the same
    document lengths, e.g. written by `megatron-infini eval passkey-data --answer-weight`): the
    loss of predicting token t is weighted by weight[t], loss = sum(w * l) / sum(w); empty: all 1.
    Not with a blended train_data."""
    tokenizer: str = ""
    """Tokenizer the data was made with: a sentencepiece .model, a Hugging Face tokenizer.json, or a
    directory holding one; empty: the tokenizer shipped with the package."""
    seed: int = 1234
    """Seed of the document order."""
    reset_attention_mask: bool = False
    """Documents do not see each other (Megatron's flag): each document of a window starts from an
    empty Infini memory with its own segments and local attention. The trainer finds the document
    starts after every EOS and passes the micro batch as one packed sequence [1, b * s] with
    PackedSeqParams (qkv_format thd); window edges are boundaries too. Off: windows are read as
    one stream each, across documents (docs/data.md)."""
    reset_position_ids: bool = False
    """Position ids restart at 0 at each document (Megatron's flag; the position after each EOS)."""
    eod_mask_loss: bool = False
    """No loss where the input token is EOS, i.e. on predicting a document's first token from the
    previous document (Megatron's flag; the EOS itself is still a label)."""

    def validate(self, prefix: str = "data") -> None:
        # paths are checked when the data is opened, with the file named
        from megatron_infini.data.blend import parse_blend

        for key in ("train_data", "valid_data"):
            try:
                parse_blend(getattr(self, key), f"{prefix}.{key}")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.train_loss_weights and len(parse_blend(self.train_data)) > 1:
            raise ConfigError(f"{prefix}.train_loss_weights is aligned with one corpus; it cannot be "
                              f"combined with a blended {prefix}.train_data")


@dataclass
class TrainConfig:
    """Steps, batch and sequence."""

    steps: int = 40
    """Optimizer steps to run in total (a resumed run continues up to this)."""
    micro_batch_size: int = 2
    """Sequences per rank per forward pass."""
    global_batch_size: int = 4
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills the gap)."""
    seq_length: int = 256
    """Tokens per training sequence; the model reads it segment by segment."""
    seed: int = 1234
    """Seed of the weight initialisation and of every rank's RNG."""
    require_whole_segments: bool = True
    """Refuse a seq_length that is not a multiple of model.segment_length."""
    eval_interval: int = 0
    """Evaluate the validation loss every this many steps; 0 = never."""
    eval_iters: int = 4
    """Validation batches per evaluation."""
    compile: bool = False
    """torch.compile every transformer layer (the Infini op compiles without graph breaks)."""
    max_consecutive_skips: int = 10
    """Steps with a non-finite loss or gradient are skipped (never applied, counted as
    `skipped_steps`); after this many in a row the run stops with exit code 3. 0 = never stop."""
    hang_timeout_s: float = 1800.0
    """When no step completes for this long, every rank prints its Python stacks and the run exits
    with code 4 (docs/faults.md). Must exceed the longest step + evaluation + synchronous
    checkpoint save (an 8B save with optimizer state, ~130 GB, at 100 MB/s takes ~22 min);
    0 = off."""
    hang_timeout_first_step_s: float = 3600.0
    """The same limit for the first step of a job (torch.compile, warm-up, first data reads)."""

    def validate(self, prefix: str = "train") -> None:
        for key in ("steps", "micro_batch_size", "global_batch_size", "seq_length", "eval_iters"):
            _at_least(f"{prefix}.{key}", getattr(self, key), 1)
        _at_least(f"{prefix}.eval_interval", self.eval_interval, 0)
        for key in ("max_consecutive_skips", "hang_timeout_s", "hang_timeout_first_step_s"):
            _at_least(f"{prefix}.{key}", getattr(self, key), 0)


@dataclass
class OptimizerConfig:
    """AdamW with separate parameter groups for the Infini gates and for norms/biases."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices (norms, biases and gates get none)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    gate_lr: float = 1e-2
    """Learning rate of the Infini gates beta (docs/infini.md: a global lr leaves ~95% of gates at 0.5)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 = off."""
    warmup_steps: int = 4
    """Linear warm-up steps."""
    decay_steps: Optional[int] = None
    """Cosine decay length after warm-up; default: train.steps - warmup_steps."""
    schedule: str = "cosine"
    """cosine | constant (after warm-up)."""
    impl: str = "auto"
    """AdamW implementation: auto (torch_fused on GPU, torch on CPU) | torch | torch_fused (one
    fused kernel, nothing to build) | deepspeed (DeepSpeed's FusedAdam, GPU only, compiled just
    in time on every node: needs nvcc and ninja there)."""

    def validate(self, prefix: str = "optimizer") -> None:
        for key in ("lr", "gate_lr", "min_lr", "weight_decay", "clip_grad", "eps"):
            _at_least(f"{prefix}.{key}", getattr(self, key), 0)
        _at_least(f"{prefix}.warmup_steps", self.warmup_steps, 0)
        _one_of(f"{prefix}.schedule", self.schedule, ("cosine", "constant"))
        _one_of(f"{prefix}.impl", self.impl, ("auto", "torch", "torch_fused", "deepspeed"))
        if self.min_lr > self.lr:
            raise ConfigError(f"{prefix}.min_lr ({self.min_lr}) must not exceed {prefix}.lr ({self.lr})")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed engine settings."""

    zero_stage: int = 1
    """ZeRO stage: 0 (plain data parallel), 1, 2 or 3."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32. bf16 keeps fp32 master weights in the
    optimizer and the Infini memory in fp32."""
    grad_accum_dtype: str = "auto"
    """With bf16: dtype the micro-batch gradients are accumulated in. auto: fp32 (as Megatron) with
    ZeRO 1-3, bf16 with zero_stage 0 (DeepSpeed has no fp32 accumulation without ZeRO) | fp32 | bf16."""
    communication_data_type: str = "fp32"
    """With bf16: dtype of the data-parallel gradient reduction, fp32 (as Megatron) | bf16."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config entries merged over ours (for knobs not exposed here)."""

    def validate(self, prefix: str = "deepspeed") -> None:
        _one_of(f"{prefix}.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _one_of(f"{prefix}.precision", self.precision, ("auto", "bf16", "fp32"))
        _one_of(f"{prefix}.grad_accum_dtype", self.grad_accum_dtype, ("auto", "fp32", "bf16"))
        _one_of(f"{prefix}.communication_data_type", self.communication_data_type, ("fp32", "bf16"))
        if self.grad_accum_dtype == "fp32" and self.zero_stage == 0 and self.precision == "bf16":
            raise ConfigError(f"{prefix}.grad_accum_dtype=fp32 with bf16 needs {prefix}.zero_stage >= 1 "
                              "(DeepSpeed accumulates in bf16 without ZeRO); use auto or bf16")


@dataclass
class CheckpointConfig:
    """Checkpoints under run_dir/checkpoints."""

    save_interval: int = 0
    """Save every this many steps (and at the end); 0 = only at the end and on stop requests."""
    save_at_end: bool = True
    """Save when the planned steps are done (benchmarks turn this off)."""
    keep_last: int = 3
    """Keep the newest this many checkpoints; 0 keeps all."""
    resume: str = "auto"
    """auto (latest complete checkpoint in run_dir, if any) | none | a checkpoint path."""
    exit_duration_minutes: float = 0.0
    """Save and exit with the requeue code after this many minutes; 0 = no limit."""
    async_save: bool = False
    """Write the periodic checkpoints in the background (a forked writer per rank; the
    checkpoint is published at a later step boundary once all writers are done). Saves on a
    stop request and at the end stay synchronous; ZeRO-3 always saves synchronously."""
    allow_fresh_optimizer: bool = False
    """When the checkpoint's optimizer state cannot be resharded to this run (written before the
    sharded optimizer format, or by another optimizer), continue with a new optimizer state
    instead of failing. Layout changes (tp, cp, dp, ZeRO stage) do not need it."""

    def validate(self, prefix: str = "checkpoint") -> None:
        _at_least(f"{prefix}.save_interval", self.save_interval, 0)
        _at_least(f"{prefix}.keep_last", self.keep_last, 0)
        _at_least(f"{prefix}.exit_duration_minutes", self.exit_duration_minutes, 0)


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl and Weights & Biases."""

    wandb_mode: str = "disabled"
    """online | offline (local run directory, `wandb sync` later) | disabled (never imports wandb)."""
    wandb_project: str = "megatron-infini"
    """W&B project."""
    wandb_entity: Optional[str] = None
    """W&B entity (team); default: the user's."""
    run_name: Optional[str] = None
    """Display name of the run; default: the run directory's name."""
    progress_bar: bool = True
    """Show a progress bar with ETA on rank 0's console."""
    log_interval: int = 1
    """Print a metrics line every this many steps (metrics.jsonl gets every step)."""

    def validate(self, prefix: str = "logging") -> None:
        _one_of(f"{prefix}.wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))
        _at_least(f"{prefix}.log_interval", self.log_interval, 1)


@dataclass
class Config:
    """Everything one training run needs."""

    run_dir: str = "runs/debug"
    """Directory of this run: resolved config, metrics, checkpoints, logs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> "Config":
        if not self.run_dir:
            raise ConfigError("run_dir must be set")
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.validate(f.name)
        m, t = self.model, self.train
        if t.require_whole_segments and t.seq_length % m.segment_length:
            raise ConfigError(
                f"train.seq_length ({t.seq_length}) must be a multiple of model.segment_length "
                f"({m.segment_length}); set train.require_whole_segments=false to allow a short last segment"
            )
        cp = self.parallel.context_parallel_size
        if cp > 1 and m.memory_type != "infini":
            raise ConfigError(f"parallel.context_parallel_size ({cp}) > 1 is not supported with "
                              f"model.memory_type={m.memory_type!r}; use 1")
        if cp > 1 and t.seq_length % (cp * m.segment_length):
            raise ConfigError(
                f"train.seq_length ({t.seq_length}) must be a multiple of parallel.context_parallel_size ({cp}) "
                f"x model.segment_length ({m.segment_length}) = {cp * m.segment_length}: each context-parallel "
                "rank holds whole segments"
            )
        if self.data.reset_attention_mask and m.memory_repeat_max > 1:
            raise ConfigError("data.reset_attention_mask does not combine with model.memory_repeat_max > 1 (the "
                              "augmentation draws per segment of the unpacked input); set one of them off")
        tp = self.parallel.tensor_model_parallel_size
        groups = m.num_query_groups or m.num_attention_heads
        if m.num_attention_heads % tp or groups % tp:
            raise ConfigError(
                f"model.num_attention_heads ({m.num_attention_heads}) and model.num_query_groups ({groups}) "
                f"must be divisible by parallel.tensor_model_parallel_size ({tp})"
            )
        return self

    def check_world(self, world_size: int) -> int:
        """Validate against the number of ranks; return the data-parallel size."""
        tp, cp = self.parallel.tensor_model_parallel_size, self.parallel.context_parallel_size
        if world_size % (tp * cp):
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size ({tp}) x "
                f"parallel.context_parallel_size ({cp})"
            )
        dp = world_size // (tp * cp)
        t = self.train
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.micro_batch_size "
                f"({t.micro_batch_size}) x data-parallel size ({dp}) = {t.micro_batch_size * dp}"
            )
        return dp


# --------------------------------------------------------------------------- (de)serialisation


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str) -> None:
    """Write the resolved config (atomically: a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
    os.replace(tmp, path)


def _field_types(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently coerce) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (list, List):
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # a single path given on the command line
            value = [value] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _unknown(key: str, name: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    parent = key[: -len(name)]
    hint = f"; did you mean {parent + close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _build(cls, data: Dict[str, Any], prefix: str = ""):
    types = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in types:
            raise _unknown(key, name, list(types))
        kwargs[name] = _coerce(key, value, types[name])
    return cls(**kwargs)


def _is_str_field(tp) -> bool:
    if typing.get_origin(tp) is typing.Union:
        return str in typing.get_args(tp)
    return tp is str


def _set_dotted(data: Dict[str, Any], dotted: str, value: Any, raw: Optional[str] = None) -> None:
    cls = Config
    node = data
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        types = _field_types(cls)
        key = ".".join(parts[: i + 1])
        if part not in types:
            raise _unknown(key, part, list(types))
        tp = types[part]
        if i == len(parts) - 1:
            # YAML reads `on`/`no`/`1e3` as bool/float; a string field keeps the text as typed
            node[part] = raw if raw is not None and _is_str_field(tp) and raw != "null" else value
        else:
            if not dataclasses.is_dataclass(tp):
                if typing.get_origin(tp) in (dict, Dict):  # free-form mapping, e.g. deepspeed.extra.x
                    sub = node.setdefault(part, {})
                    for p in parts[i + 1 : -1]:
                        sub = sub.setdefault(p, {})
                    sub[parts[-1]] = value
                    return
                raise ConfigError(f"{key} is not a section; cannot set {dotted!r}")
            node = node.setdefault(part, {})
            cls = tp


def parse_override(text: str):
    """`key.sub=value` -> ("key.sub", value, raw text), the value read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value, raw


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or defaults when path is None), apply dotted overrides, validate."""
    data: Dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    for text in overrides:
        key, value, raw = parse_override(text)
        _set_dotted(data, key, value, raw)
    return _build(Config, data).validate()
