import json

import pytest

from longlora_jax.attention.dispatch import AttentionSpec
from longlora_jax.core.errors import LongLoraError
from longlora_jax.training import options
from longlora_jax.training.tasks import EXTEND
from longlora_jax.training.recipe import RunSpec, TrainConfig


def test_the_command_line_spells_the_recipe():
  args = options.parser(EXTEND, "doc").parse_args(
      ["--ckpt", "m", "--ctx", "64", "--lr", "1e-3", "--steps", "7",
       "--accum", "2", "--beta2", "0.95", "--dtype", "float32",
       "--group-ratio", "0.5", "--s2-variant", "roll", "--s2-impl", "chunked",
       "--s2-by-group", "--lora-rank", "4"])
  spec = options.make_spec(options.given(args), task="extend",
                           base_config={"model_type": "llama"})
  assert spec.recipe == TrainConfig(
      attention=AttentionSpec("s2", variant="roll", group_ratio=0.5,
                              implementation="chunked", by_group=True),
      lr=1e-3, steps=7, accum=2, beta2=0.95, dtype="float32")
  assert (spec.ckpt, spec.ctx, spec.lora_rank) == ("m", 64, 4)
  # Options -> spec -> options, and the spec through run.json's JSON.
  assert options.make_spec(options.options_of(spec), task="extend",
                           base_config=spec.base_config) == spec
  assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_defaults_are_the_official_recipe():
  spec = options.make_spec({"ckpt": "m", "ctx": 8192}, task="extend",
                           base_config={})
  r = spec.recipe
  assert (r.lr, r.warmup, r.steps, r.accum, r.weight_decay, r.dtype,
          r.remat) == (2e-5, 20, 1000, 8, 0.0, "bfloat16", "full")
  assert r.attention == AttentionSpec("s2", "flash", 0.25, "auto")
  assert (spec.mode, spec.lora_rank, spec.lora_alpha, spec.batch) == (
      "lora+", 8, 16.0, 1)
  assert options.default("lr") == 2e-5
  assert options.default("s2_variant") == "flash"
  assert options.default("attention") == "s2"


def test_full_attention_with_an_s2_implementation_is_refused():
  with pytest.raises(LongLoraError, match="drop it with --full-attn"):
    options.make_spec({"ckpt": "m", "ctx": 64, "attention": "full",
                       "s2_impl": "pallas"}, task="extend", base_config={})
  with pytest.raises(LongLoraError, match="--s2-by-group runs S²-Attn's "
                     "groups; drop it with --full-attn"):
    options.make_spec({"ckpt": "m", "ctx": 64, "attention": "full",
                       "s2_by_group": True}, task="extend", base_config={})
  spec = options.make_spec({"ckpt": "m", "ctx": 64, "attention": "full"},
                           task="extend", base_config={})
  assert spec.recipe.attention.kind == "full"
  with pytest.raises(ValueError, match="unknown run options"):
    options.make_spec({"ckpt": "m", "ctx": 64, "learning_rate": 1},
                      task="extend", base_config={})


def test_offload_is_an_option_and_old_run_records_load():
  args = options.parser(EXTEND, "doc").parse_args(
      ["--ckpt", "m", "--ctx", "64", "--offload", "activations"])
  spec = options.make_spec(options.given(args), task="extend",
                           base_config={})
  assert spec.recipe.offload == "activations"
  assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
  # run.json of a run from before the option: no "offload" in its recipe.
  old = spec.to_dict()
  del old["recipe"]["offload"]
  assert RunSpec.from_dict(old).recipe.offload == "none"
  assert options.default("offload") == "none"
  with pytest.raises(SystemExit):
    options.parser(EXTEND, "doc").parse_args(["--offload", "weights"])


def test_the_parser_is_the_tasks_with_its_checkpoints_defaults():
  from pathlib import Path
  from longlora_jax.training.tasks import SFT
  tiny = options.CheckpointDefaults(ckpt="tiny", options={"steps": 9},
                                    out=Path("runs/tiny"))
  extend = options.parser(EXTEND, "doc", tiny)
  sft = options.parser(SFT, "doc")
  flags = lambda p: {a.dest: a for a in p._actions}
  assert "text_field" in flags(extend) and "text_field" not in flags(sft)
  assert flags(extend)["steps"].help == "optimizer steps (1000; tiny 9)"
  assert flags(extend)["ckpt"].help.endswith(", or tiny (the default)")
  assert flags(extend)["out"].help == (
      "run directory (default runs/extend/NAME-CTX; tiny: runs/tiny)")
  assert flags(sft)["steps"].help == "optimizer steps (1000)"
  assert flags(sft)["out"].help == "run directory (default runs/sft/NAME-CTX)"
  assert "Yukang/LongAlpaca-12k" in flags(sft)["data"].help
  # Unset options stay unset (a resumed run keeps its own), shared ones too.
  assert options.given(sft.parse_args(["--ctx", "64"])) == {"ctx": 64}
  assert options.given(sft.parse_args(["--mesh", "data=2", "--dtype",
                                       "float32"])) == {
      "mesh": "data=2", "dtype": "float32"}
  with pytest.raises(SystemExit):
    sft.parse_args(["--dtype", "float16"])


def test_gguf_and_original_ctx_are_recorded_and_old_records_load():
  args = options.parser(EXTEND, "doc").parse_args(
      ["--ckpt", "m", "--ctx", "64", "--gguf", "q8_0", "--original-ctx",
       "8192"])
  spec = options.make_spec(options.given(args), task="extend",
                           base_config={})
  assert (spec.gguf, spec.original_ctx) == ("q8_0", 8192)
  assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
  # run.json of a run from before the options: no GGUF, the context told
  # from the checkpoint's files.
  old = spec.to_dict()
  del old["gguf"], old["original_ctx"]
  assert (RunSpec.from_dict(old).gguf,
          RunSpec.from_dict(old).original_ctx) == (None, None)
  # A GGUF may be asked for when resuming; the original context may not
  # change (it is the model the run trains).
  assert "gguf" in options.RESUMABLE
  assert "original_ctx" not in options.RESUMABLE
  for bad in (["--gguf", "q4"], ["--original-ctx", "0"]):
    with pytest.raises(SystemExit):
      options.parser(EXTEND, "doc").parse_args(bad)


def test_quantize_is_a_run_option_and_full_ft_of_4_bits_is_refused():
  args = options.parser(EXTEND, "doc").parse_args(
      ["--ckpt", "m", "--ctx", "64", "--quantize", "nf4"])
  spec = options.make_spec(options.given(args), task="extend",
                           base_config={})
  assert spec.quantize == "nf4" and options.default("quantize") == "none"
  assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
  with pytest.raises(LongLoraError, match="drop --full-ft"):
    options.make_spec({"ckpt": "m", "ctx": 64, "quantize": "nf4",
                       "mode": "full"}, task="extend", base_config={})
