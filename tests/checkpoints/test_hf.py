import dataclasses
import json
import os
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from longlora_jax import CheckpointError, forward, load_hf, save_hf
from longlora_jax.model.config import RopeScaling
from longlora_jax.checkpoints import hf as hf_io
from longlora_jax.checkpoints.checkpoint import Checkpoint, param_shardings
from longlora_jax.parallel.sharding import make_mesh
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch
from tests.conftest import SHARED_TOKENIZER


def _fresh(tmp_path, name="mha", seed=0, **save_kwargs):
  """A private copy (tests below damage it)."""
  directory = tmp_path / f"ckpt_{name}"
  model = hf_models.save_hf_llama(directory, hf_models.TINY_CONFIGS[name],
                                  seed=seed, **save_kwargs)
  return directory, model


def _tiny_tokenizer(directory):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello",
                                       "world"])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
      unk_token="<unk>")
  fast.save_pretrained(directory)
  return directory


def _logits(config, params, ids):
  return np.asarray(forward(config, params, jnp.asarray(ids)))


@pytest.mark.parametrize("name", sorted(hf_models.TINY_CONFIGS)
                         + sorted(hf_models.FAMILY_CONFIGS))
def test_round_trip_through_transformers(tiny_hf, tmp_path, name):
  directory, hf_model = tiny_hf(name)
  config, params = load_hf(directory, dtype="float32")
  out = save_hf(config, params, tmp_path / "out")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32).eval()
  assert type(reloaded) is type(hf_model)
  ids = hf_models.random_ids(config.vocab_size, 2, 40)
  np.testing.assert_array_equal(hf_models.hf_logits(reloaded, ids),
                                hf_models.hf_logits(hf_model, ids))
  saved = json.loads((out / "config.json").read_text())
  if config.rope_type == "linear":
    # Exactly the two keys transformers 4.34-4.42 accept.
    assert saved["rope_scaling"] == {"type": "linear", "factor": 4.0}
  rope = hf_models.rope_parameters
  assert rope(reloaded.config.rope_parameters) == rope(
      hf_model.config.rope_parameters)
  gen = json.loads((out / "generation_config.json").read_text())
  for key in ("bos_token_id", "eos_token_id"):
    assert gen.get(key) == getattr(hf_model.config, key, None)
  assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_saved_config_keeps_training_rope_scaling(tiny_hf, tmp_path):
  # A model extended with PI must export the factor it was trained with.
  directory, _ = tiny_hf("mha")
  config, params = load_hf(directory, dtype="float32")
  extended = config.with_context(4 * config.max_position_embeddings)
  out = save_hf(extended, params, tmp_path / "out")
  hf = transformers.AutoConfig.from_pretrained(out)
  assert hf.rope_parameters["rope_type"] == "linear"
  assert hf.rope_parameters["factor"] == 4.0


def test_sharded_safetensors_both_ways(tiny_hf, tmp_path, monkeypatch):
  # Sharded files, and parameters sharded over 8 devices: loaded into their
  # shards and saved from them, one tensor (one layer) at a time.
  directory, hf_model = tiny_hf("gqa")
  sharded = tmp_path / "sharded"
  hf_model.save_pretrained(sharded, max_shard_size="40KB")
  assert (sharded / "model.safetensors.index.json").exists()
  checkpoint = Checkpoint.open(sharded)
  config = checkpoint.config
  params = checkpoint.params("float32", param_shardings(
      config, make_mesh("fsdp=4,tensor=2")))
  ids = hf_models.random_ids(config.vocab_size, 1, 20)
  np.testing.assert_allclose(_logits(config, params, ids),
                             hf_models.hf_logits(hf_model, ids), atol=1e-4)
  gathered, to_host = [], hf_io.to_host
  monkeypatch.setattr(hf_io, "to_host", lambda x, *a, **k: gathered.append(
      (y := to_host(x, *a, **k)).nbytes) or y)
  out = save_hf(config, params, tmp_path / "out", max_shard_size="40KB")
  largest = max(p.numel() * 4 for p in hf_model.parameters())
  assert max(gathered) == largest and len(gathered) == len(
      hf_model.state_dict())
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  total = sum(v.nbytes for s in shards for v in load_file(out / s).values())
  assert index["metadata"]["total_size"] == total
  reloaded = transformers.LlamaForCausalLM.from_pretrained(
      out, dtype=torch.float32).eval()
  np.testing.assert_array_equal(hf_models.hf_logits(reloaded, ids),
                                hf_models.hf_logits(hf_model, ids))


def test_bfloat16_checkpoint_values_exact(tmp_path):
  model = hf_models.make_hf_llama(hf_models.TINY_CONFIGS["mha"]).to(
      torch.bfloat16)
  model.save_pretrained(tmp_path / "bf16")
  config, params = load_hf(tmp_path / "bf16", dtype="float32")
  want = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(params["layers"]["mlp"]["down_proj"]["kernel"][1],
                                want)
  config, params = load_hf(tmp_path / "bf16")  # default dtype: bfloat16
  assert params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
  out = save_hf(config, params, tmp_path / "out")
  assert transformers.AutoConfig.from_pretrained(out).dtype == torch.bfloat16
  np.testing.assert_array_equal(
      load_file(out / "model.safetensors")["model.norm.weight"].astype(np.float32),
      model.model.norm.weight.detach().float().numpy())


def test_pytorch_bin_fallback(tmp_path):
  directory, model = _fresh(tmp_path, "gqa")
  os.remove(directory / "model.safetensors")
  torch.save(model.state_dict(), directory / "pytorch_model.bin")
  config, params = load_hf(directory, dtype="float32")
  ids = hf_models.random_ids(config.vocab_size, 2, 12)
  np.testing.assert_allclose(_logits(config, params, ids),
                             hf_models.hf_logits(model, ids), atol=1e-4)


def test_legacy_rotary_buffer_ignored(tmp_path):
  directory, model = _fresh(tmp_path)
  tensors = load_file(directory / "model.safetensors")
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  load_hf(directory, dtype="float32")


def test_loads_layer_by_layer(tmp_path, monkeypatch):
  # The loader's own host working set is about one layer's tensor, not a
  # stacked tensor, let alone the model: each layer goes to its place on the
  # device as soon as it is read. (tracemalloc sees the NumPy buffers, not
  # XLA's device buffers, which on the CPU are host memory too.)
  kwargs = dict(vocab_size=256, hidden_size=256, intermediate_size=512,
                num_hidden_layers=8, num_attention_heads=4)
  model = hf_models.make_hf_llama(kwargs)
  model.save_pretrained(tmp_path / "m")
  model_bytes = sum(p.numel() * 4 for p in model.parameters())
  read_bytes = []
  open_weights = hf_io.open_weights

  def counting(directory):
    weights = open_weights(directory)
    read = lambda name, index=...: read_bytes.append(
        (part := weights.read(name, index)).nbytes) or part
    return dataclasses.replace(weights, read=read)
  monkeypatch.setattr(hf_io, "open_weights", counting)
  load_hf(tmp_path / "m", dtype="float32")  # Warm import and trace caches.
  read_bytes.clear()
  tracemalloc.start()
  try:
    params = load_hf(tmp_path / "m", dtype="float32")[1]
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert sum(read_bytes) == model_bytes  # every weight read exactly once
  layer = 256 * 512 * 4  # the largest tensor of one layer
  stacked = 8 * layer  # what a loader that stacks on the host would hold
  # Two layers' worth: one read may overlap the last one's pending copy.
  assert peak < 2.5 * layer < stacked / 3, (peak, model_bytes)
  np.testing.assert_array_equal(
      params["layers"]["mlp"]["up_proj"]["kernel"][3],
      model.model.layers[3].mlp.up_proj.weight.detach().numpy().T)


def test_hub_id_from_local_cache(tiny_hf, tmp_path, monkeypatch):
  from huggingface_hub import constants
  directory, hf_model = tiny_hf("mha")
  snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "abc123"
  shutil.copytree(directory, snapshot)
  refs = tmp_path / "hub" / "models--acme--tiny-llama" / "refs"
  refs.mkdir()
  (refs / "main").write_text("abc123")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  config, params = load_hf("hf:acme/tiny-llama", dtype="float32")
  ids = hf_models.random_ids(config.vocab_size, 1, 8)
  np.testing.assert_allclose(_logits(config, params, ids),
                             hf_models.hf_logits(hf_model, ids), atol=1e-4)


def test_hub_id_offline_and_uncached(tmp_path, monkeypatch):
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
  with pytest.raises(CheckpointError) as e:
    load_hf("hf:meta-llama/Llama-2-7b-hf")
  message = str(e.value)
  assert "hf:meta-llama/Llama-2-7b-hf is not in the local Hugging Face cache" in message
  assert "hf download meta-llama/Llama-2-7b-hf" in message


def _damage(directory, what):
  config_file = directory / "config.json"
  weights = directory / "model.safetensors"
  if what == "missing_dir":
    shutil.rmtree(directory)
  elif what == "no_config":
    config_file.unlink()
  elif what == "bad_json":
    config_file.write_text("{not json")
  elif what == "gpt2":
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "model_type": "gpt2",
                                       "architectures": ["GPT2LMHeadModel"]}))
  elif what == "wrong_shape":
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((7, 64), np.float32)
    save_file(tensors, weights, metadata={"format": "pt"})
  elif what == "missing_tensor":
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
  elif what == "extra_tensor":
    tensors = load_file(weights)
    tensors["model.layers.0.self_attn.q_proj.lora_A.weight"] = np.zeros((8, 64), np.float32)
    save_file(tensors, weights, metadata={"format": "pt"})
  elif what == "truncated":
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
  elif what == "no_weights":
    weights.unlink()
  elif what == "missing_shard":
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    weights.unlink()


@pytest.mark.parametrize("what,message", [
    ("missing_dir", "no such directory"),
    ("no_config", r"config.json: not found"),
    ("bad_json", r"config.json: not valid JSON"),
    ("gpt2", r"config.json: model_type='gpt2'.*not supported; supported "
             "families: llama, mistral, qwen2, qwen3"),
    ("wrong_shape", r"model.safetensors: tensor model.layers.1.mlp.up_proj.weight has shape \(7, 64\), but config.json implies \(128, 64\)"),
    ("missing_tensor", "tensor model.layers.1.self_attn.k_proj.weight is missing"),
    ("extra_tensor", "q_proj.lora_A.weight"),
    ("truncated", "model.safetensors: cannot read safetensors.*truncated or corrupt"),
    ("no_weights", "no weights found"),
    ("missing_shard", "lists model-00002-of-00002.safetensors, which is missing"),
])
def test_bad_checkpoints(tmp_path, what, message):
  directory, _ = _fresh(tmp_path)
  _damage(directory, what)
  with pytest.raises(CheckpointError, match=message):
    load_hf(directory, dtype="float32")


def test_save_refuses_to_clobber_and_leaves_nothing_half_written(tiny_hf, tmp_path):
  directory, _ = tiny_hf("mha")
  config, params = load_hf(directory, dtype="float32")
  out = tmp_path / "out"
  out.mkdir()
  (out / "precious.txt").write_text("keep")
  with pytest.raises(CheckpointError, match="exists and is not empty"):
    save_hf(config, params, out)
  assert (out / "precious.txt").read_text() == "keep"

  # Params that do not fit the config: nothing is created.
  bad = jax.tree.map(lambda x: x, params)
  bad["norm"]["weight"] = jnp.ones(3)
  with pytest.raises(CheckpointError, match=r"norm/weight has shape \(3,\)"):
    save_hf(config, bad, tmp_path / "new")
  with pytest.raises(CheckpointError, match="no tokenizer files"):
    save_hf(config, params, tmp_path / "new", tokenizer_from=tmp_path / "out")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

  # A failure while writing removes the partial directory.
  class Boom(Exception):
    pass

  def fail(*args, **kwargs):
    raise Boom()
  original = hf_io.write_safetensors
  hf_io.write_safetensors = fail
  try:
    with pytest.raises(Boom):
      save_hf(config, params, tmp_path / "new")
  finally:
    hf_io.write_safetensors = original
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

  # overwrite=True swaps the directory in whole.
  save_hf(config, params, out, overwrite=True)
  assert not (out / "precious.txt").exists() and (out / "config.json").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_tokenizer_files_are_copied(tiny_hf, tmp_path):
  directory, _ = tiny_hf("mha")
  config, params = load_hf(directory, dtype="float32")
  tok_dir = _tiny_tokenizer(tmp_path / "tok")
  out = save_hf(config, params, tmp_path / "out", tokenizer_from=tok_dir)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok("hello world")["input_ids"] == [3, 4]


@pytest.mark.skipif(not os.path.isdir(SHARED_TOKENIZER),
                    reason="shared Llama-2 tokenizer fixture not present")
def test_real_llama2_tokenizer_is_copied(tiny_hf, tmp_path):
  directory, _ = tiny_hf("mha")
  config, params = load_hf(directory, dtype="float32")
  out = save_hf(config, params, tmp_path / "out", tokenizer_from=SHARED_TOKENIZER)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok("12345")["input_ids"] == [1, 29871, 29896, 29906, 29941, 29946, 29945]


@pytest.mark.skipif(not os.path.isdir(SHARED_TOKENIZER),
                    reason="shared Llama-2 tokenizer fixture not present")
@pytest.mark.parametrize("files", [
    ("tokenizer.model",),
    ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")],
    ids=["meta_release", "merge_script"])
def test_sentencepiece_tokenizer_is_written_anew(tiny_hf, tmp_path, files):
  # tokenizer.model without tokenizer.json (Meta's releases, the official
  # merge script): transformers 5 reads a copy of it with "a  b" and
  # indented code wrong, so the export writes tokenizer.json from the
  # tokenizer that encodes as SentencePiece.
  import sentencepiece
  from tests.checkpoints.test_tokenizer import TEXTS
  source = tmp_path / "source"
  source.mkdir()
  for f in files:
    shutil.copy(os.path.join(SHARED_TOKENIZER, f), source)
  sp = sentencepiece.SentencePieceProcessor(
      model_file=str(source / "tokenizer.model"))
  config, params = load_hf(tiny_hf("mha")[0], dtype="float32")
  out = save_hf(config, params, tmp_path / "out", tokenizer_from=source)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  for text in TEXTS:
    assert tok(text)["input_ids"] == [1] + sp.encode(text), text
  assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
  assert (out / "tokenizer.model").read_bytes() == (
      source / "tokenizer.model").read_bytes()


def test_dtype_override_and_bad_dtype(tiny_hf, tmp_path):
  directory, _ = tiny_hf("mha")
  config, params = load_hf(directory, dtype="float32")
  out = save_hf(config, params, tmp_path / "fp16", dtype="float16")
  tensors = load_file(out / "model.safetensors")
  assert {v.dtype for v in tensors.values()} == {np.dtype(np.float16)}
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
  with pytest.raises(CheckpointError, match="unknown dtype 'float8'"):
    load_hf(directory, dtype="float8")


def test_rope_scaling_survives_load_save_load(tiny_hf, tmp_path):
  directory, _ = tiny_hf("pi4")
  config, params = load_hf(directory, dtype="float32")
  assert config.rope_scaling == RopeScaling(4.0)
  out = save_hf(config, params, tmp_path / "out")
  again, _ = load_hf(out, dtype="float32")
  assert again == config


def test_loading_memory_by_hand():
  from longlora_jax import LlamaConfig
  config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=8, num_attention_heads=4)
  shardings = param_shardings(config, make_mesh("fsdp=8"))
  peaks = hf_io.loading_memory(config, shardings, "float32")
  layer = 256 * 512 * 4  # one layer of an MLP matrix, the largest part
  # Per layer 4 attention (256^2) + 3 MLP (256x512) matrices + 2 norms;
  # embedding, lm_head, final norm; everything split 8 ways.
  model = (8 * (4 * 256**2 + 3 * 256 * 512 + 2 * 256) + 2 * 256**2 + 256) * 4
  assert peaks == {"device_final": model // 8,
                   "device_transient": 2 * layer // 8,
                   "host_transient": layer}
  # A process holding 2 of the 8 devices reads a quarter of that layer.
  assert hf_io.loading_memory(config, shardings, "bfloat16",
                              process_devices=2)["host_transient"] == (
      layer // 2 // 4)


def test_loading_memory_of_nf4_by_hand():
  """Quantized as read: each device holds its share of the 4-bit stacks,
  the host one layer's whole weight in bf16 and its quantization's work."""
  from longlora_jax import LlamaConfig
  config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=8, num_attention_heads=4)
  shardings = param_shardings(config, make_mesh("fsdp=8"))
  peaks = hf_io.loading_memory(config, shardings, "bfloat16", quantize="nf4")
  # A layer of an attention matrix, 256^2 values: 4 bits a value and a
  # uint8 absmax a block of 64, split 8 ways; 1024 / 256 float32 nested
  # absmaxes, the 256 float32 code and the offset on every device.
  attention = 256**2 // 2 // 8 + 256**2 // 64 // 8 + 4 * 4 + 1024 + 4
  mlp = 256 * 512 // 2 // 8 + 256 * 512 // 64 // 8 + 8 * 4 + 1024 + 4
  # bf16 norms (2 a layer and the final one), embedding and head, split 8.
  plain = (8 * 2 * 256 + 256 + 2 * 256**2) * 2 // 8
  # The host: an MLP matrix in bf16, its codes, 40 bytes a block of 64 and
  # 32 MiB of chunk work (nf4.quantize_host_bytes).
  n = 256 * 512
  assert peaks == {
      "device_final": 8 * (4 * attention + 3 * mlp) + plain,
      "device_transient": 2 * mlp,
      "host_transient": 2 * n + n // 2 + 40 * n // 64 + 32 * 2**20}
