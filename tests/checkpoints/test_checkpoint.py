import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import sentencepiece
import transformers
from flax import traverse_util

from longlora_jax.checkpoints import hf as hf_io
from longlora_jax.checkpoints.checkpoint import (Checkpoint, load_model,
                                                 load_tokenizer,
                                                 param_shardings)
from longlora_jax.checkpoints.hub import resolve_checkpoint
from longlora_jax.parallel.sharding import make_mesh
from tests.conftest import SHARED_TOKENIZER

needs_llama_tokenizer = pytest.mark.skipif(
    not os.path.isdir(SHARED_TOKENIZER),
    reason="needs the Llama-2 tokenizer fixture")

# Meta's Llama-2 chat prompt (its system prompt has two spaces after
# "safe."), indented code, and other runs of whitespace.
SYSTEM = ("[INST] <<SYS>>\nYou are a helpful, respectful and honest "
          "assistant. Always answer as helpfully as possible, while being "
          "safe.  Your answers should not include any harmful content.\n"
          "<</SYS>>\n\nHi there [/INST]")
TEXTS = [
    "12345", "Hello world", "a  b", "a   b    c", "End.  Next sentence.",
    "\tindent\t\ttabs", "line1\nline2\n\n  line3", "  leading", "trailing  ",
    " ", "", SYSTEM,
    "def f(x):\n    if x:\n        return 1\n    return 2\n",
    "naïve café 日本語 🤗", "3.14159 and 2024-01-01",
]


@pytest.fixture(scope="module")
def sp():
  if not os.path.isdir(SHARED_TOKENIZER):
    pytest.skip("needs the Llama-2 tokenizer fixture")
  return sentencepiece.SentencePieceProcessor(
      model_file=os.path.join(SHARED_TOKENIZER, "tokenizer.model"))


def _tokenizer_dir(path, with_config=True, **settings):
  """tokenizer.model, and the fixture's tokenizer_config.json with
  `settings` changed."""
  path.mkdir()
  shutil.copy(os.path.join(SHARED_TOKENIZER, "tokenizer.model"), path)
  if with_config:
    with open(os.path.join(SHARED_TOKENIZER, "tokenizer_config.json")) as f:
      (path / "tokenizer_config.json").write_text(
          json.dumps({**json.load(f), **settings}))
  return path


@pytest.mark.parametrize("with_config,settings", [
    (True, {}), (True, {"legacy": False}), (False, {})],
    ids=["fixture", "not_legacy", "model_alone"])
def test_sentencepiece_only_encodes_as_sentencepiece(tmp_path, sp, with_config,
                                                     settings):
  tok = load_tokenizer(_tokenizer_dir(tmp_path / "tok", with_config,
                                      **settings))
  assert tok("12345")["input_ids"] == [1, 29871, 29896, 29906, 29941, 29946,
                                       29945]
  for text in TEXTS:
    assert tok(text)["input_ids"] == [1] + sp.encode(text), text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == (
        sp.decode(sp.encode(text))), text
  assert tok(TEXTS, add_special_tokens=False)["input_ids"] == [
      sp.encode(t) for t in TEXTS]
  assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_add_bos_and_eos_settings_are_kept(tmp_path, sp):
  tok = load_tokenizer(_tokenizer_dir(tmp_path / "tok", add_bos_token=False,
                                      add_eos_token=True))
  assert tok("a  b")["input_ids"] == sp.encode("a  b") + [2]


def test_official_merge_output(tiny_hf, tmp_path, sp):
  # What merge_lora_weights_and_save_hf_model.py saves with transformers
  # 4.34: the model, and its slow tokenizer with a [PAD] token added.
  directory, _ = tiny_hf("mha")
  ckpt = shutil.copytree(directory, tmp_path / "merged")
  _tokenizer_dir(
      tmp_path / "tok", pad_token="[PAD]", model_max_length=8192,
      padding_side="right", added_tokens_decoder={"32000": {
          "content": "[PAD]", "lstrip": False, "normalized": False,
          "rstrip": False, "single_word": False, "special": True}})
  for f in (tmp_path / "tok").iterdir():
    shutil.copy(f, ckpt)
  (ckpt / "added_tokens.json").write_text('{"[PAD]": 32000}')
  (ckpt / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]",
       "unk_token": "<unk>"}))
  checkpoint = Checkpoint.open(ckpt)
  tok = checkpoint.tokenizer
  assert (tok.pad_token_id, len(tok), checkpoint.eos_id) == (32000, 32001, 2)
  assert tok(SYSTEM)["input_ids"] == [1] + sp.encode(SYSTEM)
  assert tok(["a  b", "c"], padding=True)["input_ids"] == [
      [1, 263, 29871, 289], [1, 274, 32000, 32000]]


@needs_llama_tokenizer
def test_tokenizer_json_is_used_as_it_is(tmp_path):
  # A checkpoint with tokenizer.json: transformers' tokenizer of that file,
  # whatever it encodes.
  directory = tmp_path / "tok"
  transformers.AutoTokenizer.from_pretrained(SHARED_TOKENIZER).save_pretrained(
      directory)
  assert (directory / "tokenizer.json").exists()
  shutil.copy(os.path.join(SHARED_TOKENIZER, "tokenizer.model"), directory)
  ours = load_tokenizer(directory)
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  assert type(ours) is type(theirs)
  assert ours(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"]


@pytest.mark.parametrize("mesh", ["fsdp=8", "fsdp=4,tensor=2"])
def test_loads_straight_into_the_planned_shards(tiny_hf, monkeypatch, mesh):
  directory, model = tiny_hf("gqa")  # every axis but layers divisible by 8
  reads = []  # (tensor name, bytes of one read)
  open_weights = hf_io.open_weights

  def counting(directory):
    weights = open_weights(directory)
    read = lambda name, index=...: reads.append(
        (name, (part := weights.read(name, index)).nbytes)) or part
    return dataclasses.replace(weights, read=read)
  monkeypatch.setattr(hf_io, "open_weights", counting)
  checkpoint = Checkpoint.open(directory)
  mesh = make_mesh(mesh)
  shardings = param_shardings(checkpoint.config, mesh)
  params = checkpoint.params("float32", shardings)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  planned = traverse_util.flatten_dict(shardings)
  for path, value in traverse_util.flatten_dict(params).items():
    sharding = planned[path]
    assert value.sharding == sharding, path
    # Each device holds its part: 1/8 of a tensor split over both axes,
    # 1/4 of one split over fsdp=4 alone, etc.
    parts = int(np.prod([mesh.shape[a] for a in sharding.spec if a]))
    assert parts > 1, path  # nothing here is left replicated
    for shard in value.addressable_shards:
      assert shard.data.nbytes * parts == value.nbytes, path
    # No read was ever larger than one device's part of one layer, so no
    # tensor (let alone a stacked one) was ever whole anywhere.
    layers = value.shape[0] if path[0] == "layers" else 1
    biggest = max(n for name, n in reads
                  if name in {hf_io.hf_name(path, i if layers > 1 else None)
                              for i in range(layers)})
    assert biggest * parts * layers == value.nbytes, path
    # The values are the transformers model's, exactly.
    names = [hf_io.hf_name(path, i) for i in range(layers)] if (
        path[0] == "layers") else [hf_io.hf_name(path)]
    want = np.stack([state[n].T if path[-1] == "kernel" else state[n]
                     for n in names]) if path[0] == "layers" else (
        state[names[0]].T if path[-1] == "kernel" else state[names[0]])
    np.testing.assert_array_equal(np.asarray(value), want, err_msg=str(path))


@pytest.mark.parametrize("ctx,pi_factor,factor", [
    (None, None, 1.0), (1024, None, 4.0), (1000, None, 4.0), (None, 6, 6.0),
    (1024, 1, 1.0)])
def test_load_model_sets_the_rope_factor_from_ctx_or_pi_factor(
    ctx, pi_factor, factor):
  model = load_model("demo", "float32", "fsdp=4,tensor=2", ctx=ctx,
                     pi_factor=pi_factor)
  # The demo model's native context is 256: ceil(ctx / 256); --pi-factor
  # wins over --ctx, and 1 means no scaling.
  assert model.config.rope_factor == factor
  assert (model.config.rope_scaling is None) == (factor == 1.0)
  assert model.directory == resolve_checkpoint("demo")
  # Every weight read into its shards on the mesh asked for, in float32.
  for leaf in traverse_util.flatten_dict(model.params).values():
    assert dict(leaf.sharding.mesh.shape) == {
        "data": 1, "fsdp": 4, "tensor": 2, "context": 1}
    assert leaf.dtype == np.float32
