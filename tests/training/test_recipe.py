from longlora_jax.model.config import LlamaConfig, RopeScaling
from longlora_jax.training.recipe import RunSpec, target_config


def test_fine_tuning_keeps_a_larger_rope_factor():
  base = LlamaConfig(max_position_embeddings=32)
  extended = LlamaConfig(max_position_embeddings=32,
                         rope_scaling=RopeScaling(4.0))
  spec = lambda ctx, task: RunSpec(ckpt="x", ctx=ctx, task=task,
                                   base_config={})
  assert target_config(spec(64, "sft"), extended).rope_factor == 4.0
  assert target_config(spec(256, "sft"), extended).rope_factor == 8.0
  assert target_config(spec(64, "sft"), base).rope_factor == 2.0
  assert target_config(spec(32, "sft"), base).rope_factor == 1.0
  # Context extension sets the factor the official code computes.
  assert target_config(spec(64, "extend"), extended).rope_factor == 2.0


def test_a_run_recorded_with_the_old_name_of_the_dense_implementation_resumes():
  record = RunSpec(ckpt="demo", ctx=64, task="extend", base_config={}).to_dict()
  assert record["recipe"]["attention"]["implementation"] == "auto"
  record["recipe"]["attention"]["implementation"] = "xla"  # before "dense"
  spec = RunSpec.from_dict(record)
  assert spec.recipe.attention.implementation == "dense"
  assert spec.task.name == "extend"
