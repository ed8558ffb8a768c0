"""A run's outputs: the merged model (HF format, and GGUF for llama.cpp) and
the PEFT adapter, from the end of training or from any saved checkpoint,
and how to load them."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from longlora_jax.model.config import LlamaConfig
from longlora_jax.core.errors import CheckpointError, LongLoraError
from longlora_jax.checkpoints.checkpoint import Checkpoint, param_shardings
from longlora_jax.checkpoints.gguf import check_gguf, save_gguf
from longlora_jax.checkpoints.hf import save_hf
from longlora_jax.checkpoints.peft.adapter import save_peft
from longlora_jax.parallel.sharding import make_mesh
from longlora_jax.training import saving
from longlora_jax.training.recipe import (MODES, RunSpec, read_spec,
                                          target_config)
from longlora_jax.training.step import initial_run_state, params_of


def write_outputs(spec: RunSpec, base: Checkpoint, config: LlamaConfig,
                  params, targets: dict[str, Path], *, overwrite: bool = True,
                  max_shard_size: int | str = "5GB",
                  gguf_type: str | None = None) -> dict[str, Path]:
  """Writes `params` (the run's tree, LoRA nodes included) to each of
  `targets`: "hf" the merged model (with `base`'s tokenizer), "peft" the
  adapter, "gguf" the merged model as one GGUF file of `gguf_type`
  (default the run's --gguf, else f16); `config` carries the RoPE scaling.
  Each appears only once complete."""
  if "peft" in targets and spec.mode == "full":
    raise LongLoraError("a full fine-tuning run has no adapter; export it "
                        "as --format hf")
  dtype = jnp.dtype(spec.recipe.dtype)
  card = lambda kind: model_card(spec, base, config, kind)
  written = {}
  # Every process takes part (the parameters may be sharded over them);
  # process 0 writes, one tensor at a time, LoRA merged a layer at a time.
  if "hf" in targets:
    written["hf"] = save_hf(config, params, targets["hf"],
                            tokenizer_from=base.directory, dtype=dtype,
                            overwrite=overwrite, merge_lora=True,
                            max_shard_size=max_shard_size, card=card("hf"))
  if "peft" in targets:
    written["peft"] = save_peft(
        config, params, targets["peft"], extra=MODES[spec.mode],
        base_model_name_or_path=_hub_name(base), dtype=dtype,
        overwrite=overwrite, card=card("peft"))
  if "gguf" in targets:
    written["gguf"] = save_gguf(
        targets["gguf"], config, params, base.directory,
        qtype=gguf_type or spec.gguf or "f16", merge_lora=True,
        overwrite=overwrite)
  return written if jax.process_index() == 0 else {}


def model_card(spec: RunSpec, base: Checkpoint, config: LlamaConfig,
               kind: str) -> str:
  """The README.md of an export ("hf": the merged model, "peft": the
  adapter): Hub metadata, then what was extended, how, and the precision
  of the weights, including a 4-bit base the weights were trained over."""
  rope = config.to_hf_dict()["rope_parameters"]
  weights = _base_precision(spec) or (
      f"The weights are {spec.recipe.dtype} (the run's compute dtype)"
      + (", the adapters merged in." if kind == "hf" else "."))
  library = "transformers" if kind == "hf" else "peft"
  return (f"---\nbase_model: {_hub_name(base)}\nlibrary_name: {library}\n"
          "tags:\n- longlora\n- long-context\n---\n\n"
          f"# {base.name} extended to {config.context:,} tokens\n\n"
          f"LongLoRA ({spec.task.name}, {spec.mode}, rank {spec.lora_rank}, "
          f"alpha {spec.lora_alpha:g}; attention "
          f"{spec.recipe.attention.kind}) over {base.name}, whose original "
          f"context is {config.original_context:,} tokens. RoPE: {rope}.\n\n"
          f"{weights}\n")


def _base_precision(spec: RunSpec) -> str | None:
  """What a run over 4-bit frozen weights says of its exports (the run's
  last lines and every model card), or None for a run over full weights."""
  if spec.quantize == "none":
    return None
  return (f"base weights: 4-bit {spec.quantize.upper()} (trained over them); "
          f"the merged model holds them dequantized to {spec.recipe.dtype}, "
          "the adapters merged in; the PEFT adapter gives this run's logits "
          "on that dequantized base, not on the original unquantized one")


def gguf_name(qtype: str) -> str:
  """The GGUF file's name in a run (or export) directory."""
  return f"model-{qtype}.gguf"


def _hub_name(base: Checkpoint) -> str:
  """How transformers finds `base`: its Hub id, else its directory."""
  if base.name.startswith("hf:"):
    return base.name[3:].partition("@")[0]
  return str(Path(base.directory).absolute())


def describe(written: dict[str, Path], config: LlamaConfig,
             spec: RunSpec | None = None) -> str:
  """Where `written` (from `write_outputs`) lies and how to load the
  adapter; `config` is the trained one, with its RoPE scaling; `spec` the
  run's, which says whether its base was 4-bit."""
  lines = []
  if spec is not None and written and (note := _base_precision(spec)):
    lines.append(note)
  if "hf" in written:
    lines.append(f"merged model (HF format): {written['hf']}")
  if "peft" in written:
    rope = config.to_hf_dict()["rope_parameters"]
    lines.append(
        f"PEFT adapter (LoRA + modules_to_save): {written['peft']}\n"
        "load it with PyTorch and peft on its base model (recorded in "
        "adapter_config.json) with the RoPE scaling it was trained with, "
        "in float32 (the merged model's logits):\n"
        "  import torch\n"
        "  from peft import AutoPeftModelForCausalLM\n"
        f"  model = AutoPeftModelForCausalLM.from_pretrained("
        f"'{written['peft']}', dtype=torch.float32, "
        f"rope_parameters={rope}, "
        f"max_position_embeddings={config.max_position_embeddings})")
  if "gguf" in written:
    lines.append(f"GGUF (llama.cpp, context {config.context}): "
                 f"{written['gguf']}")
  return "\n\n".join(lines)


def load_run(run_dir: Path, step: int | None = None, mesh: str | None = None,
             gguf_type: str | None = None):
  """(spec, base checkpoint, extended config, params with LoRA nodes, step)
  of a saved checkpoint of the run in `run_dir`: `step`, else the newest
  that reads completely (newer unreadable ones are named in a warning and
  left in place: `--resume` sets them aside), sharded over `mesh` (default:
  the run's). A GGUF of `gguf_type` that llama.cpp would not run is refused
  before any weight is read."""
  spec = read_spec(run_dir)
  directory = run_dir / "checkpoints"
  steps = saving.steps_in(directory)
  if not steps:
    raise LongLoraError(f"{run_dir}: no checkpoints saved yet")
  if step is None:
    step, bad = saving.newest_readable(directory)
    if step is None:
      raise CheckpointError(f"{saving.describe_unreadable(directory, bad)}; "
                            "no checkpoint of this run reads completely")
    if bad:
      print(f"warning: {saving.describe_unreadable(directory, bad)}; "
            f"exporting step {step}", file=sys.stderr)
  elif step not in steps:
    raise LongLoraError(f"{run_dir}: no checkpoint of step {step}; saved: "
                        f"{', '.join(map(str, steps))}")
  elif why := saving.unreadable(directory / str(step)):
    readable = [s for s in steps
                if s != step and not saving.unreadable(directory / str(s))]
    raise CheckpointError(
        f"{directory / str(step)} is unreadable ({why}); readable steps: "
        f"{', '.join(map(str, readable)) or 'none'}")
  base = Checkpoint.open(spec.ckpt, spec.original_ctx)
  if base.config.to_hf_dict() != spec.base_config:
    raise CheckpointError(f"{spec.ckpt} is no longer the model {run_dir} was "
                          "trained from (its config.json differs)")
  if gguf_type:
    check_gguf(target_config(spec, base.config), gguf_type)
  device_mesh = make_mesh(mesh or spec.mesh)
  state = initial_run_state(spec, base.params(
      spec.recipe.dtype, param_shardings(base.config, device_mesh),
      spec.quantize), device_mesh)
  mngr = saving.manager(directory, read_only=True)
  state, _ = saving.restore(mngr, step, state)
  mngr.close()
  return spec, base, target_config(spec, base.config), params_of(state), step
