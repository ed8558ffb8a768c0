"""What defines a run, in one vocabulary from the command line (`--lr`) to
run.json (`"lr"`) to the train step (`TrainConfig.lr`).

`TrainConfig` is what the train step needs: the optimisation recipe and the
attention it trains with, described by data (`AttentionSpec`). `RunSpec` is
a whole run: the model, context, data, LoRA and mesh around a
`TrainConfig`. Defaults are the official LongLoRA fine-tuning (8 GPUs x
micro-batch 1 x accumulation 8, AdamW at 2e-5 with 20 warmup steps then
constant, no weight decay, bf16, gradient checkpointing, LoRA rank 8 /
alpha 16 on q,k,v,o plus the embedding and norms, S²-Attn groups of ctx/4).
beta2 is 0.999, what the official scripts run (HF Trainer's default); the
paper states 0.95.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from longlora_jax.model import by_group, lora
from longlora_jax.parallel.sharding import parse_mesh
from longlora_jax.attention import cudnn_grouped
from longlora_jax.attention.pallas import grouped as pallas_grouped
from longlora_jax.attention.dispatch import AttentionSpec, on_nvidia_gpu
from longlora_jax.attention.groups import SHIFTED, s2_group_size
from longlora_jax.model.config import LlamaConfig
from longlora_jax.core import cli
from longlora_jax.core.errors import LongLoraError
from longlora_jax.core.files import write_json
from longlora_jax.training import tasks
from longlora_jax.training.tasks import EXTEND, Task

SCHEDULES = ("constant", "cosine", "linear")
# What lives in pinned host memory instead of the accelerator's: the layer
# inputs between the forward and backward pass, and the optimizer's moments
# between updates (`step.OffloadedStep`).
OFFLOADS = cli.OPTIONS["--offload"]["choices"]
RUN_FILE = "run.json"
# What trains besides the adapters, per mode ("full" trains every weight).
# "lora+embed" and "lora+norm", LoRA+ halves, are the ablation's
# (`bench.ablation`); the commands offer the others.
MODES = {"lora+": lora.LORA_PLUS, "lora": (), "full": None,
         "lora+embed": ("embed",), "lora+norm": ("norm",)}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The optimisation recipe of the train step.

  accum: micro-batches per optimizer step (the leading axis of the batch
  the step takes); dtype: compute dtype and that of the frozen weights;
  offload "activations": remat "full" with the layer inputs it keeps in
  pinned host memory; "optimizer": AdamW's moments in pinned host memory,
  brought to the device for the update only; "activations,optimizer" both
  (the same step either way, less device memory).
  """
  attention: AttentionSpec = AttentionSpec()
  remat: str = "full"
  offload: str = "none"
  dtype: str = "bfloat16"
  accum: int = 8
  loss_chunk: int = 2048
  lr: float = 2e-5
  warmup: int = 20
  schedule: str = "constant"
  steps: int = 1000
  beta1: float = 0.9
  beta2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0

  def __post_init__(self):
    if not isinstance(self.attention, AttentionSpec):
      raise LongLoraError(f"attention must be an AttentionSpec, got "
                          f"{self.attention!r}")
    if self.schedule not in SCHEDULES:
      raise LongLoraError(f"unknown schedule {self.schedule!r}; choose one of "
                          f"{', '.join(SCHEDULES)}")
    if self.accum < 1:
      raise LongLoraError(f"accum must be >= 1, got {self.accum}")
    if self.offload not in OFFLOADS:
      raise LongLoraError(f"unknown offload {self.offload!r}; choose one of "
                          f"{', '.join(OFFLOADS)}")
    if self.offloads("activations") and self.remat != "full":
      raise LongLoraError(f"--offload activations moves what --remat full "
                          f"keeps to the host; it needs --remat full, not "
                          f"{self.remat}")

  def offloads(self, what: str) -> bool:
    """Whether `what` ("activations" or "optimizer") lives in host memory."""
    return what in self.offload.split(",")

  @property
  def remat_policy(self) -> str:
    """The model's remat policy (`model.remat.REMAT_POLICIES`) for this recipe."""
    return "offload" if self.offloads("activations") else self.remat


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything that defines a run; saved as run.json in its directory.

  ckpt: the base checkpoint (`hf:ORG/NAME`, a directory or `demo`); ctx:
  the context it trains at; task: what it trains for (`tasks.EXTEND`,
  packed documents, or `tasks.SFT`, instructions; given by name, as
  run.json records it, it is looked up); data: default the task's; mode:
  a key of `MODES` ("lora+", "lora", "full", ...); rope: how RoPE extends ("auto", "linear" or
  "yarn", see `Task.target_config`); batch: sequences per data-parallel
  device per micro-batch; base_config: the base checkpoint's config.json,
  to recognise it on resume; original_ctx: the original context a
  checkpoint in Meta's layout is opened with (None: decided from its
  files); gguf: the GGUF type (`gguf.QTYPES`) also written at the end, or
  None; quantize: "nf4" to hold the frozen layer kernels in 4 bits
  (`Checkpoint.params`), else "none".
  """
  ckpt: str
  ctx: int
  base_config: dict
  task: Task = EXTEND
  data: str | None = None
  text_field: str = "text"
  mode: str = "lora+"
  lora_rank: int = 8
  lora_alpha: float = 16.0
  mesh: str = "fsdp=-1"
  rope: str = "auto"
  batch: int = 1
  seed: int = 0
  save_every: int = 100
  keep: int = 2
  original_ctx: int | None = None
  gguf: str | None = None
  quantize: str = "none"
  recipe: TrainConfig = TrainConfig()

  def __post_init__(self):
    if isinstance(self.task, str):
      object.__setattr__(self, "task", tasks.named(self.task))
    if self.data is None:
      object.__setattr__(self, "data", self.task.data)

  def to_dict(self) -> dict[str, Any]:
    """run.json's record: the task by its name."""
    return {**dataclasses.asdict(self), "task": self.task.name}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
    recipe = dict(d["recipe"])
    attention = dict(recipe["attention"])
    # Runs recorded before the dense implementation had its name called it
    # "xla"; they still resume.
    if attention.get("implementation") == "xla":
      attention["implementation"] = "dense"
    recipe["attention"] = AttentionSpec(**attention)
    return cls(**{**d, "recipe": TrainConfig(**recipe)})


def read_spec(run_dir: Path) -> RunSpec:
  file = run_dir / RUN_FILE
  if not file.exists():
    raise LongLoraError(f"{run_dir}: no {RUN_FILE}; not a train.extend or "
                        "train.sft run directory")
  try:
    return RunSpec.from_dict(json.loads(file.read_text()))
  except (json.JSONDecodeError, TypeError, KeyError, ValueError,
          LongLoraError) as e:
    raise LongLoraError(f"{file}: not a run record of this version "
                        f"({type(e).__name__}: {e})") from None


def write_spec(run_dir: Path, spec: RunSpec) -> None:
  write_json(run_dir / RUN_FILE, spec.to_dict())


def target_config(spec: RunSpec, config: LlamaConfig) -> LlamaConfig:
  """The base config with the RoPE scaling the run trains with, by its
  task's rule (`Task.target_config`)."""
  return spec.task.target_config(config, spec.ctx, spec.rope)


def group_size(spec: RunSpec) -> int | None:
  """S²-Attn's group size in tokens; None for full attention."""
  attention = spec.recipe.attention
  return int(spec.ctx * attention.group_ratio) if attention.kind == "s2" \
      else None


def check_ctx(spec: RunSpec, config: LlamaConfig) -> None:
  """--ctx against the checkpoint and the S²-Attn groups, with the nearest
  valid contexts when it does not split into groups."""
  original, extends = config.context, spec.task.extends
  if extends and spec.ctx <= original:
    raise LongLoraError(
        f"--ctx {spec.ctx} is not larger than the checkpoint's context of "
        f"{original} tokens; extend it, e.g. --ctx {2 * original} or --ctx "
        f"{4 * original}")
  attention = spec.recipe.attention
  if attention.kind != "s2":
    return
  def valid(ctx):
    try:
      s2_group_size(ctx, group_ratio=attention.group_ratio)
      return ctx > original or not extends
    except ValueError:
      return False
  if not valid(spec.ctx):
    lowest = original if extends else 0
    below = next((c for c in range(spec.ctx - 1, lowest, -1) if valid(c)),
                 None)
    above = next((c for c in range(spec.ctx + 1, 4 * spec.ctx + 64)
                  if valid(c)), None)
    nearest = " or ".join(str(c) for c in (below, above) if c)
    raise LongLoraError(
        f"--ctx {spec.ctx} does not split into S²-Attn groups of "
        f"{attention.group_ratio:g} x ctx tokens (an even group size that "
        "divides the context); " + (
            f"nearest valid: {nearest}" if nearest else
            "no context near it does; use --group-ratio "
            + _nearest_ratios(spec.ctx, attention.group_ratio)))


def _nearest_ratios(ctx: int, ratio: float) -> str:
  """The group ratios nearest `ratio` that split `ctx` into groups."""
  ratios = [g / ctx for g in range(2, ctx + 1, 2) if ctx % g == 0]
  below = max((r for r in ratios if r < ratio), default=None)
  above = min((r for r in ratios if r > ratio), default=None)
  return " or ".join(f"{r:g}" for r in (below, above) if r) or "0.25"


def check_attention(spec: RunSpec, config: LlamaConfig) -> None:
  """An explicit S²-Attn implementation that cannot run here, refused
  before anything loads."""
  attention = spec.recipe.attention
  impl = attention.implementation
  why = attention.by_group and by_group.refusal(config, parse_mesh(
      spec.mesh, jax.device_count())["context"])
  if why:
    raise LongLoraError(f"--s2-by-group cannot run {config.model_type}: "
                        f"{why}; drop it")
  if attention.kind != "s2" or impl not in ("cudnn", "pallas"):
    return
  fix = "; use --s2-impl auto (or dense, chunked)"
  if attention.variant not in SHIFTED:
    raise LongLoraError(f"--s2-impl {impl} shifts half of the heads; "
                        f"--s2-variant {attention.variant} runs by --s2-impl "
                        "dense or chunked")
  if not on_nvidia_gpu(None):
    raise LongLoraError(f"--s2-impl {impl} needs an NVIDIA GPU{fix}")
  if spec.task.packed:
    raise LongLoraError(f"--s2-impl {impl} cannot keep the packed examples "
                        f"of train.{spec.task.name} apart{fix}")
  if impl == "cudnn" and spec.recipe.dtype not in ("bfloat16", "float16"):
    raise LongLoraError(f"--s2-impl cudnn runs bfloat16 only (--dtype "
                        f"{spec.recipe.dtype}){fix}")
  dims = (cudnn_grouped.HEAD_DIMS if impl == "cudnn"
          else pallas_grouped.HEAD_DIMS)
  if config.head_dim not in dims:
    raise LongLoraError(f"--s2-impl {impl} does not take head_dim "
                        f"{config.head_dim}{fix}")


def check_counts(spec: RunSpec) -> None:
  for name, value in (("batch", spec.batch), ("accum", spec.recipe.accum),
                      ("steps", spec.recipe.steps),
                      ("save_every", spec.save_every), ("keep", spec.keep),
                      ("lora_rank", spec.lora_rank)):
    if value < 1:
      raise LongLoraError(f"--{name.replace('_', '-')} must be >= 1")

