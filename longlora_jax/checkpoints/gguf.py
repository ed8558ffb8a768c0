"""GGUF export (`save_gguf`): a merged model as one file that llama.cpp,
Ollama and LM Studio run, written with the `gguf` package.

It is what llama.cpp's own converter (convert_hf_to_gguf.py) writes for
these families: its tensor names; for the llama arch, q and k rows permuted
back to Meta's interleaved RoPE pairs (GQA-aware); norms and biases in
float32, the matrices in the chosen type (q8_0 falls back to f16 for rows
that are not whole 32-value blocks); the trained RoPE scaling in its keys
(llama3 as a `rope_freqs` tensor); and the tokenizer embedded. One tensor
(one layer of a stacked parameter) at a time comes to the host, is
converted and written, so the host never holds two.
"""

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import gguf
import jax
import numpy as np
from gguf import GGMLQuantizationType as Q

from longlora_jax.core.errors import CheckpointError
from longlora_jax.core.files import atomic_path
from longlora_jax.checkpoints.hf import (_slice, check_params,
                                         expected_shapes, hf_tensors, to_host)
from longlora_jax.checkpoints.checkpoint import load_tokenizer
from longlora_jax.checkpoints.hub import TOKENIZER_FILES, resolve_checkpoint
from longlora_jax.model.config import LlamaConfig
from longlora_jax.model.rope import rope_frequencies

# qtype -> (the type of the matrices, general.file_type).
QTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
          "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
          "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
          "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
# model_type -> llama.cpp arch (its converter writes Mistral as llama).
# OLMo 2: its norms after attention and MLP and q/k norms over whole
# projections are llama.cpp's olmo2 graph, with HF's rotate-half RoPE.
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
         "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "olmo2": gguf.MODEL_ARCH.OLMO2}
# tokenizer.json Split regexes -> llama.cpp's name for that pre-tokenizer
# (Llama 3, Qwen2, Mistral's tekken), as the models' tokenizer.json spell them.
_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "tekken",
}
_T = gguf.TokenType


def check_gguf(config: LlamaConfig, qtype: str = "f16") -> None:
  """Refuses (one line) what llama.cpp would not run as our model does."""
  if qtype not in QTYPES:
    raise CheckpointError(f"GGUF type {qtype!r}: choose one of "
                          f"{', '.join(QTYPES)}")
  arch, kind, s = config.model_type, config.rope_type, config.rope_scaling
  if arch not in ARCHS:
    raise CheckpointError(f"GGUF export of {arch} models is not supported "
                          f"(only {', '.join(ARCHS)}); export --format hf and "
                          "convert with llama.cpp's convert_hf_to_gguf.py")
  if kind == "dynamic":
    raise CheckpointError("dynamic (NTK) RoPE scaling has no GGUF form "
                          "llama.cpp reads; extend with linear or yarn")
  if kind == "llama3" and ARCHS[arch] != gguf.MODEL_ARCH.LLAMA:
    raise CheckpointError(f"llama.cpp's {arch} arch reads no llama3 RoPE "
                          "factors; extend it with linear or yarn")
  if kind == "yarn" and (
      s.mscale or s.mscale_all_dim or s.truncate is False
      or (s.beta_fast or 32) != 32 or (s.beta_slow or 1) != 1
      or not math.isclose(s.attention_factor or 0.1 * math.log(s.factor) + 1,
                          0.1 * math.log(s.factor) + 1)):
    raise CheckpointError(
        "llama.cpp's yarn uses beta_fast 32, beta_slow 1, attention factor "
        "0.1 ln(factor) + 1 and truncated ramps; this config's yarn "
        f"{s.hf_dict()} differs, so GGUF cannot carry it")
  if arch == "qwen3" and config.o_bias:
    raise CheckpointError("llama.cpp's qwen3 has no o_proj bias; this "
                          "config has one, so GGUF cannot carry it")
  if arch in ("qwen2", "olmo2") and (
      config.num_attention_heads * config.head_dim != config.hidden_size):
    raise CheckpointError(f"llama.cpp's {arch} needs heads x head_dim == "
                          "hidden_size; this config differs")
  if config.sliding_window is not None and config.sliding_window < (
      config.context):
    raise CheckpointError(
        f"llama.cpp runs {arch} without a sliding window, and this config "
        f"attends within {config.sliding_window} of its {config.context} "
        "tokens; use a checkpoint without one")


def interleave(w, heads: int):
  """HF's q or k rows (`[heads * head_dim, ...]`, halves rotated together)
  in Meta's order (pairs of neighbours), which llama.cpp's llama arch
  rotates; what its converter's `permute` does. `heads`: q heads for q, kv
  heads for k. Its inverse swaps the last two axes of the same reshape."""
  rows = w.shape[0]
  return (w.reshape(heads, 2, rows // heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _metadata(writer: gguf.GGUFWriter, config: LlamaConfig, qtype: str,
              name: str) -> None:
  # GGUFWriter.add_<key>(value) for each.
  keys = {"type": gguf.GGUFType.MODEL, "name": name,
          "file_type": QTYPES[qtype][1],
          "quantization_version": gguf.GGML_QUANT_VERSION,
          "vocab_size": config.vocab_size,
          # The context the model was trained for, not its base's.
          "context_length": config.context,
          "embedding_length": config.hidden_size,
          "feed_forward_length": config.intermediate_size,
          "block_count": config.num_hidden_layers,
          "head_count": config.num_attention_heads,
          "head_count_kv": config.num_key_value_heads,
          "key_length": config.head_dim, "value_length": config.head_dim,
          "rope_dimension_count": config.head_dim,
          "rope_freq_base": config.rope_theta,
          "layer_norm_rms_eps": config.rms_norm_eps}
  for key, value in keys.items():
    getattr(writer, f"add_{key}")(value)
  s = config.rope_scaling
  if config.rope_type == "linear":
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(s.factor)
  elif config.rope_type == "yarn":
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(s.factor)
    writer.add_rope_scaling_orig_ctx_len(config.original_context)
    writer.add_rope_scaling_yarn_beta_fast(32.0)
    writer.add_rope_scaling_yarn_beta_slow(1.0)
  # llama3: no keys; the per-frequency factors are the rope_freqs tensor.


# ---- the tokenizer ----

def _pre_parts(tokenizer: dict) -> list[dict]:
  """The pre-tokenizers of a tokenizer.json, a Sequence's or the one."""
  pre = tokenizer.get("pre_tokenizer") or {}
  return pre.get("pretokenizers", [pre])


def _pre_tokenizer(tokenizer: dict, source: Path) -> str:
  """llama.cpp's name for a byte-level BPE's pre-tokenizer (how text is cut
  before merging)."""
  parts = _pre_parts(tokenizer)
  splits = [p.get("pattern", {}).get("Regex") for p in parts
            if p.get("type") == "Split"]
  gpt2 = [p for p in parts if p.get("type") == "ByteLevel"
          and p.get("use_regex", True)]
  if len(splits) == 1 and splits[0] in _SPLITS and not gpt2:
    return _SPLITS[splits[0]]
  if not splits and gpt2:
    return "gpt-2"
  if not tokenizer["model"].get("merges"):
    return "default"  # Without merges every byte is a token, however cut.
  known = ", ".join(sorted({*_SPLITS.values(), "gpt-2"}))
  raise CheckpointError(
      f"{source}: its pre-tokenizer {json.dumps(parts)[:120]} is none of "
      f"those llama.cpp names that we know ({known}); GGUF cannot carry it")


def _bpe_vocab(directory: Path, vocab_size: int):
  """(tokens, types, pre-tokenizer name, whether it has merges) of a
  byte-level BPE tokenizer.json: added special tokens are CONTROL, other
  added ones USER_DEFINED, ids the file lacks UNUSED [PADi] (as llama.cpp's
  converter writes them)."""
  file = directory / "tokenizer.json"
  if not file.exists():
    raise CheckpointError(f"{directory}: no tokenizer.model or tokenizer.json;"
                          " a GGUF embeds its tokenizer")
  tokenizer = json.loads(file.read_text(encoding="utf-8"))
  model = tokenizer.get("model", {})
  if model.get("type") != "BPE" or model.get("byte_fallback") or not any(
      p.get("type") == "ByteLevel" for p in _pre_parts(tokenizer)):
    raise CheckpointError(f"{file}: not a byte-level BPE, and there is no "
                          "tokenizer.model; copy the SentencePiece "
                          "tokenizer.model beside it")
  tokens = {i: t for t, i in model["vocab"].items()}
  types = dict.fromkeys(tokens, _T.NORMAL)
  for added in tokenizer.get("added_tokens", []):
    tokens[added["id"]] = added["content"]
    types[added["id"]] = _T.CONTROL if added.get("special") else (
        _T.USER_DEFINED)
  if max(tokens) >= vocab_size:
    raise CheckpointError(f"{file}: token id {max(tokens)} is beyond the "
                          f"model's vocab_size {vocab_size}")
  return ([tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)],
          [types.get(i, _T.UNUSED) for i in range(vocab_size)],
          _pre_tokenizer(tokenizer, file), bool(model.get("merges")))


def _add_tokenizer(writer: gguf.GGUFWriter, config: LlamaConfig,
                   directory: Path) -> None:
  """The tokenizer of `directory`: SentencePiece (`tokenizer.model`) as the
  "llama" model with its scores, else a byte-level BPE (`tokenizer.json`)
  as "gpt2" with its merges; the special ids and add_bos/add_eos as
  transformers' tokenizer of it has them, and the chat template of its
  tokenizer_config."""
  n = config.vocab_size
  merges = False
  if spm := (directory / "tokenizer.model").exists():
    tokens, scores, types = map(list, zip(
        *gguf.SentencePieceVocab(directory).all_tokens()))
    if len(tokens) > n:
      raise CheckpointError(f"{directory}: its tokenizer.model has "
                            f"{len(tokens)} pieces, beyond the model's "
                            f"vocab_size {n}")
    pad = range(len(tokens), n)
    tokens += [f"[PAD{i}]".encode() for i in pad]
    scores += [-1000.0] * len(pad)
    types += [_T.UNUSED] * len(pad)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_scores(scores)
    config_file = directory / "tokenizer_config.json"
    options = (json.loads(config_file.read_text()) if config_file.exists()
               else {})
    if isinstance(options.get("add_prefix_space"), bool):
      writer.add_add_space_prefix(options["add_prefix_space"])
  else:
    tokens, types, pre, merges = _bpe_vocab(directory, n)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types([int(t) for t in types])
  # gguf's guesses at the pair template warn about what GGUF does not keep.
  log = logging.getLogger("gguf.vocab")
  level, _ = log.level, log.setLevel(logging.ERROR)
  try:
    special = gguf.SpecialVocab(directory, load_merges=merges, n_vocab=n)
  finally:
    log.setLevel(level)
  if not spm and not special.merges:
    # llama.cpp requires a BPE's merges and gguf writes no empty list: one
    # merge of two tokens of several characters, which no text forms
    # without other merges, so it never applies.
    special.merges = [" ".join([t for t in tokens if len(t) > 1][:2])]
  # The special ids and whether BOS/EOS are added, as our commands' tokenizer
  # (transformers') has them; the config's ids where it names none.
  tokenizer = load_tokenizer(directory)
  eos = config.eos_token_id
  fallback = {"bos": config.bos_token_id, "pad": config.pad_token_id,
              "eos": eos[0] if isinstance(eos, tuple) else eos}
  for kind in ("bos", "eos", "unk", "pad"):
    token = getattr(tokenizer, f"{kind}_token_id")
    token = fallback.get(kind) if token is None else token
    if token is not None and 0 <= token < n:
      special.special_token_ids[kind] = token
  ids = tokenizer("a").input_ids
  for kind in ("bos", "eos"):
    token = special.special_token_ids.get(kind)
    special.add_special_token[kind] = token is not None and (
        ids[0] if kind == "bos" else ids[-1]) == token
  special.add_to_gguf(writer, quiet=True)


# ---- the tensors ----

def _plan(config: LlamaConfig, qtype: str):
  """[(GGUF name, our path, layer, HF shape, ggml type)], embedding first,
  then layer by layer, as llama.cpp's converter orders them."""
  arch = ARCHS[config.model_type]
  names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
  matrix = QTYPES[qtype][0]
  plan = []
  for hf, path, layer, shape in hf_tensors(config, expected_shapes(config)):
    name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
    if len(shape) == 1:
      kind = Q.F32  # norms and biases: llama.cpp reads them in float32
    elif matrix == Q.Q8_0 and shape[-1] % 32:
      kind = Q.F16  # rows not whole q8_0 blocks (as llama.cpp's converter)
    else:
      kind = matrix
    plan.append((name, path, layer, shape, kind))
  last = config.num_hidden_layers
  order = {"embed_tokens": -1, "norm": last, "lm_head": last + 1}
  return sorted(plan, key=lambda t: order[t[1][0]] if t[2] is None else t[2])


def _encode(w: np.ndarray, kind: Q, name: str) -> np.ndarray:
  """`w` (float32) as GGUF stores `kind`: an array of that dtype, or bytes."""
  out = gguf.quants.quantize(w, kind)
  if kind == Q.F16 and not np.isfinite(out).all() and np.isfinite(w).all():
    raise CheckpointError(f"{name} has weights beyond float16's range "
                          "(65504); export bf16 or q8_0 instead")
  return out


def _tensor(flat, config: LlamaConfig, path, layer, kind: Q, name: str):
  """One tensor, gathered to the host, in llama.cpp's layout, encoded."""
  w = to_host(_slice(flat[path], layer), np.float32,
              transpose=path[-1] == "kernel")
  if ARCHS[config.model_type] == gguf.MODEL_ARCH.LLAMA and path[1:3] in (
      ("self_attn", "q_proj"), ("self_attn", "k_proj")):
    w = interleave(w, config.num_attention_heads if path[2] == "q_proj"
                   else config.num_key_value_heads)
  return _encode(w, kind, name)


def _rope_freqs(config: LlamaConfig) -> np.ndarray:
  """llama3's factor per frequency: what llama.cpp divides its default
  inverse frequencies by to get the scaled ones."""
  scaled, _ = rope_frequencies(config, None)
  base, _ = rope_frequencies(dataclasses.replace(config, rope_scaling=None),
                             None)
  return np.asarray(base / scaled, np.float32)


def _info(writer: gguf.GGUFWriter, name: str, shape, kind: Q) -> None:
  if kind in (Q.F32, Q.F16):
    dtype = np.dtype(np.float32 if kind == Q.F32 else np.float16)
    writer.add_tensor_info(name, shape, dtype,
                           int(np.prod(shape)) * dtype.itemsize, kind)
  else:  # stored as bytes
    nbytes = gguf.quant_shape_to_byte_shape(shape, kind)
    writer.add_tensor_info(name, nbytes, np.dtype(np.uint8),
                           int(np.prod(nbytes)), kind)


def save_gguf(path: str | os.PathLike, config: LlamaConfig, params,
              tokenizer_dir: str | os.PathLike, *, qtype: str = "f16",
              name: str | None = None, merge_lora: bool = False,
              overwrite: bool = False) -> Path:
  """Writes the model as one GGUF file at `path` (atomically) and returns
  its absolute path.

  Args:
    config: the model's config, with the RoPE scaling it was trained with
      (the file's context length is `config.context`).
    params: its parameters (sharded or not); LoRA nodes are refused unless
      `merge_lora`, which writes them merged, a layer at a time.
    tokenizer_dir: where the tokenizer files are (a directory, `hf:` id or
      `demo`): tokenizer.model (SentencePiece) or tokenizer.json (byte-level
      BPE), tokenizer_config.json for add_bos and the chat template.
    qtype: f32, f16, bf16 or q8_0 (the matrices; norms and biases float32).
    name: general.name; default the file's stem.
    overwrite: replace an existing file.

  Every process of a multi-process run calls it (each tensor is gathered
  collectively); process 0 writes. Refusals (`check_gguf`, the tokenizer,
  the path) come before any tensor is gathered.
  """
  check_gguf(config, qtype)
  out = Path(path).expanduser().absolute()
  if out.is_dir():
    raise CheckpointError(f"{out}: is a directory; name the .gguf file")
  if out.exists() and not overwrite:
    raise CheckpointError(f"{out}: exists; choose another file or pass "
                          "overwrite=True")
  flat = check_params(config, params, lora_ok=merge_lora)
  tokenizer = resolve_checkpoint(tokenizer_dir, patterns=TOKENIZER_FILES)
  writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[ARCHS[
      config.model_type]])
  _metadata(writer, config, qtype, name or out.stem)
  _add_tokenizer(writer, config, tokenizer)
  freqs = _rope_freqs(config) if config.rope_type == "llama3" else None
  if freqs is not None:
    _info(writer, "rope_freqs.weight", freqs.shape, Q.F32)
  plan = _plan(config, qtype)
  for name_, _, _, shape, kind in plan:
    _info(writer, name_, shape, kind)
  if jax.process_index() != 0:
    for name_, p, layer, _, kind in plan:  # the collective gathers
      _tensor(flat, config, p, layer, kind, name_)
    return out
  with atomic_path(out) as tmp:
    try:
      writer.write_header_to_file(tmp)
      writer.write_kv_data_to_file()
      writer.write_ti_data_to_file()
      if freqs is not None:
        writer.write_tensor_data(freqs)
      for name_, p, layer, _, kind in plan:
        writer.write_tensor_data(_tensor(flat, config, p, layer, kind, name_))
    finally:
      writer.close()
  return out
