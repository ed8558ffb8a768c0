"""Meta's own release layout as a checkpoint: `params.json`, the
tensor-parallel shards `consolidated.NN.pth` and `tokenizer.model`, in a
directory or its `original/` subfolder (Llama 1 to 3.x as Meta, and
`llama model download`, ship them).

Read without torch (`pth`), each device reading only its part: the shards
are reassembled by Meta's splitting rules (fairscale's column-parallel
layers split the output rows, row-parallel ones the input columns), and
the query and key rows are permuted from Meta's interleaved rotary pairs to
the half-split layout our model uses (transformers' conversion does the
same), as an index map on the rows a device asks for.
"""

import dataclasses
import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from longlora_jax.core.errors import CheckpointError
from longlora_jax.core.files import read_json
from longlora_jax.model.config import LlamaConfig, RopeScaling
from longlora_jax.checkpoints import hf
from longlora_jax.checkpoints.pth import open_pth
from longlora_jax.checkpoints.tokenizer import (LLAMA3_SPECIAL, TIKTOKEN,
                                              model_format, read_ranks)

PARAMS = "params.json"
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "pytorch_model.bin.index.json")
# Our parameter path -> (Meta's tensor name, the axis its shards split: 0
# the output rows, 1 the input columns, None replicated; "embed" is 1 for
# Llama 1/2, 0 for Llama 3, told apart by the shapes). Rows are Meta's
# [out, in] order, the transpose of our kernels.
_TENSORS = {
    ("embed_tokens", "embedding"): ("tok_embeddings.weight", "embed"),
    ("norm", "weight"): ("norm.weight", None),
    ("lm_head", "kernel"): ("output.weight", 0),
    ("layers", "self_attn", "q_proj", "kernel"): ("attention.wq.weight", 0),
    ("layers", "self_attn", "k_proj", "kernel"): ("attention.wk.weight", 0),
    ("layers", "self_attn", "v_proj", "kernel"): ("attention.wv.weight", 0),
    ("layers", "self_attn", "o_proj", "kernel"): ("attention.wo.weight", 1),
    ("layers", "mlp", "gate_proj", "kernel"): ("feed_forward.w1.weight", 0),
    ("layers", "mlp", "up_proj", "kernel"): ("feed_forward.w3.weight", 0),
    ("layers", "mlp", "down_proj", "kernel"): ("feed_forward.w2.weight", 1),
    ("layers", "input_layernorm", "weight"): ("attention_norm.weight", None),
    ("layers", "post_attention_layernorm", "weight"): ("ffn_norm.weight",
                                                       None),
}
_AXES = {name: axis for name, axis in _TENSORS.values()}
_IGNORED = {"rope.freqs"}  # Llama 1/2's RoPE frequencies, recomputed here
_KV = ("attention.wk.weight", "attention.wv.weight")


def locate(directory: str | Path) -> Path | None:
  """The folder holding Meta's layout in a checkpoint directory: the
  directory itself or its `original/`; None when Hugging Face weights sit at
  its top (they win) or neither is there."""
  directory = Path(directory)
  if any((directory / f).exists() for f in _HF_WEIGHTS):
    return None
  for folder in (directory, directory / "original"):
    if (folder / PARAMS).exists() or any(folder.glob("consolidated.*.pth")):
      return folder
  return None


def is_meta(directory: str | Path) -> bool:
  """Whether `directory` is itself a folder in Meta's layout."""
  return locate(directory) == Path(directory)


def ffn_width(dim: int, multiple_of: int, multiplier: float | None) -> int:
  """Meta's SwiGLU width (llama/model.py FeedForward): 2/3 of 4 * dim,
  times ffn_dim_multiplier, rounded up to a multiple of multiple_of."""
  hidden = int(2 * (4 * dim) / 3)
  if multiplier is not None:
    hidden = int(multiplier * hidden)
  return multiple_of * -(-hidden // multiple_of)


def tokenizer_vocab(file: Path) -> int:
  """Tokens of Meta's tokenizer.model: its SentencePiece pieces (Llama 1,
  2, Code Llama), or its tiktoken ranks plus Meta's 256 special tokens
  (Llama 3)."""
  if model_format(file) == TIKTOKEN:
    return len(read_ranks(file)) + len(LLAMA3_SPECIAL)
  import sentencepiece
  return sentencepiece.SentencePieceProcessor(
      model_file=str(file)).get_piece_size()


def original_context(params: dict, vocab: int,
                     override: int | None = None) -> tuple[int, str]:
  """The context the model was released for, which params.json does not
  record, and why: told from what the files say (`override` wins)."""
  if override:
    return int(override), "as given"
  theta = float(params.get("rope_theta", 10000.0))
  if params.get("use_scaled_rope"):
    return 131072, "Llama 3.1 or later (params.json sets use_scaled_rope)"
  if vocab >= 128000:
    return 8192, (f"Llama 3.0 (a {vocab}-token vocab, rope_theta {theta:g}, "
                  "no use_scaled_rope)")
  if theta > 10000:
    return 16384, (f"Code Llama (rope_theta {theta:g} with a {vocab}-token "
                   "vocab)")
  if float(params.get("norm_eps", 1e-5)) <= 1e-6:
    return 2048, "Llama 1 (norm_eps 1e-06)"
  return 4096, "Llama 2 (rope_theta 10000, norm_eps 1e-05)"


def rope_scaling(params: dict) -> tuple[RopeScaling | None, str]:
  """Meta's scaled RoPE where params.json sets use_scaled_rope, and the
  factor's source. Meta's reference code fixes the factor at 8 (low 1, high
  4, original 8192); Llama 3.2 1B and 3B (dim 2048 x 16 layers, 3072 x 28)
  were trained with 32, which Meta confirmed after release and their
  Hugging Face configs say, though their params.json does not. A
  `rope_scaling_factor` in params.json (Llama 4's key) wins."""
  if not params.get("use_scaled_rope"):
    return None, "no RoPE scaling"
  factor, why = 8.0, "factor 8, Meta's llama3 constant"
  if (params["dim"], params["n_layers"]) in ((2048, 16), (3072, 28)):
    factor, why = 32.0, "factor 32, Llama 3.2 1B/3B's"
  if params.get("rope_scaling_factor"):
    factor, why = float(params["rope_scaling_factor"]), "factor from params.json"
  return RopeScaling(factor, "llama3", original_max_position_embeddings=8192,
                     low_freq_factor=1.0, high_freq_factor=float(
                         params.get("rope_high_freq_factor", 4.0))), why


def read_config(directory: Path, original_context: int | None = None
                ) -> tuple[LlamaConfig, str]:
  """(config, note) of a folder in Meta's layout, the shapes of its shards
  checked against params.json before any weight is read. The note says
  what the files did not: where the vocabulary size came from and which
  original context was chosen, and why (`original_context` overrides it)."""
  directory = Path(directory)
  params = _params(directory)
  files, shards = _open_shards(directory)
  config, note = _config(directory, params, files, shards, original_context)
  _Layout.check(directory, config, files, shards)
  return config, note


def read_params(directory: Path, config: LlamaConfig, dtype=jnp.bfloat16,
                shardings=None):
  """The weights of a folder in Meta's layout as our parameter tree, as
  `hf.read_params` reads a Hugging Face checkpoint: `shardings` places each
  device's part as it is read, one layer at a time, and a device reads only
  its rows and columns from the shards that hold them."""
  dtype = hf.as_dtype(dtype)
  layout = _Layout.check(Path(directory), config, *_open_shards(directory))
  expected = hf.expected_shapes(config)
  placement = (traverse_util.flatten_dict(shardings) if shardings is not None
               else {})
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  flat = {}
  for path, shape in expected.items():
    name = _TENSORS[path][0]
    kernel = path[-1] == "kernel"

    def read(layer, index, name=name, kernel=kernel):
      full = name if layer is None else f"layers.{layer}.{name}"
      part = layout.read(full, tuple(index)[::-1] if kernel else tuple(index))
      return (part.T if kernel else part).astype(dtype, copy=False)
    flat[path] = hf._place(shape, placement.get(path, default), read, dtype,
                           stacked=path[0] == "layers")
  return traverse_util.unflatten_dict(flat)


def _params(directory: Path) -> dict:
  file = directory / PARAMS
  params = read_json(file, error=CheckpointError, missing=(
      f"{file}: not found; Meta's layout needs its params.json beside "
      "consolidated.NN.pth, download it"))
  params = params.get("model", params) if isinstance(params, dict) else None
  missing = [k for k in ("dim", "n_layers", "n_heads")
             if not isinstance((params or {}).get(k), int)]
  if missing:
    raise CheckpointError(f"{file}: missing integer keys {missing}; not "
                          "Meta's params.json of a Llama")
  return params


def _open_shards(directory: Path):
  found = {int(m[1]): p for p in Path(directory).iterdir()
           if (m := _SHARD.fullmatch(p.name))}
  if not found:
    raise CheckpointError(f"{directory}: no consolidated.NN.pth weights "
                          "beside params.json; download them")
  missing = [i for i in range(max(found) + 1) if i not in found]
  if missing:
    raise CheckpointError(
        f"{directory / f'consolidated.{missing[0]:02d}.pth'}: missing (have "
        f"{len(found)} of {max(found) + 1} shards); download it")
  files = [found[i] for i in sorted(found)]
  return files, [open_pth(f) for f in files]


def _config(directory, params, files, shards, override):
  file = directory / PARAMS
  vocab, source = params.get("vocab_size", -1), "params.json"
  if vocab is None or vocab <= 0:
    tokenizer = directory / "tokenizer.model"
    if tokenizer.exists():
      vocab, source = tokenizer_vocab(tokenizer), "tokenizer.model"
    elif "output.weight" in shards[0]:
      vocab = shards[0]["output.weight"].shape[0] * len(shards)
      source = "the weights (no tokenizer.model)"
  context, why = original_context(params, vocab, override)
  scaling, rope = rope_scaling(params)
  llama3 = vocab >= 128000
  try:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=params["dim"],
        intermediate_size=ffn_width(params["dim"],
                                    params.get("multiple_of", 256),
                                    params.get("ffn_dim_multiplier")),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
        head_dim=params["dim"] // params["n_heads"],
        rms_norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        rope_scaling=scaling, max_position_embeddings=context,
        bos_token_id=128000 if llama3 else 1,
        # Meta's generation stops at <|end_of_text|>, <|eom_id|> and
        # <|eot_id|> (tokenizer.LLAMA3_STOP); a document ends with the first.
        eos_token_id=(128001, 128008, 128009) if llama3 else 2)
  except (CheckpointError, TypeError, ValueError) as e:
    raise CheckpointError(f"{file}: {e}") from None
  note = (f"{directory}: Meta's layout, {len(files)} shard(s); vocab {vocab} "
          f"from {source}; {rope}; original context {context} tokens: {why} "
          "(params.json does not record it; override it if wrong)")
  return config, note


@dataclasses.dataclass(frozen=True)
class _Layout:
  """The shards of one checkpoint and how Meta split each tensor."""
  files: list
  shards: list
  config: LlamaConfig
  embed_axis: int
  kv_replicas: int  # > 1: each shard holds one kv head, shared this often

  @classmethod
  def check(cls, directory, config, files, shards) -> "_Layout":
    """The layout, once every shard's tensors match what params.json
    implies; CheckpointError naming the file and the fix otherwise."""
    n, c = len(shards), config
    d, heads, kv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    sizes = {"n_heads": heads, "dim": d, "the FFN width": c.intermediate_size,
             "vocab_size": c.vocab_size}
    for what, size in sizes.items():
      if size % n:
        raise CheckpointError(
            f"{directory}: {n} shards do not divide {what}={size}; "
            "params.json or the set of consolidated.NN.pth is wrong")
    if kv % n and n % kv:
      raise CheckpointError(
          f"{directory}: n_kv_heads={kv} over {n} shards is neither split "
          "nor replicated by heads; params.json or the shard set is wrong")
    replicas = max(n // kv, 1)
    embed = shards[0].get("tok_embeddings.weight")
    axis = 1 if n > 1 and embed is not None and embed.shape[1] != d else 0
    layout = cls(files, shards, config, axis, replicas)
    want = {name: layout._shard_shape(name) for name in layout._names()}
    for file, shard in zip(files, shards):
      for name, shape in want.items():
        if name not in shard:
          raise CheckpointError(
              f"{file}: tensor {name} is missing; params.json (n_layers="
              f"{c.num_hidden_layers}) and the weights disagree")
        if shard[name].shape != shape:
          raise CheckpointError(
              f"{file}: {name} has shape {shard[name].shape}, but params.json"
              f" over {n} shard(s) implies {shape}; fix params.json, or "
              "download the missing consolidated.NN.pth")
      extra = sorted(set(shard) - set(want) - _IGNORED)
      if extra:
        raise CheckpointError(
            f"{file}: holds tensors a Llama text model does not have "
            f"({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''})")
    if replicas > 1:
      layout._check_replicas()
    return layout

  def _names(self):
    for path, (name, _) in _TENSORS.items():
      if path[0] != "layers":
        yield name
    for i in range(self.config.num_hidden_layers):
      for path, (name, _) in _TENSORS.items():
        if path[0] == "layers":
          yield f"layers.{i}.{name}"

  def _axis(self, name: str) -> int | None:
    axis = _AXES[_short(name)]
    return self.embed_axis if axis == "embed" else axis

  def _full_shape(self, name: str) -> tuple[int, ...]:
    c = self.config
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {"tok_embeddings.weight": (v, d), "output.weight": (v, d),
            "norm.weight": (d,), "attention.wq.weight": (q, d),
            "attention.wk.weight": (kv, d), "attention.wv.weight": (kv, d),
            "attention.wo.weight": (d, q), "feed_forward.w1.weight": (f, d),
            "feed_forward.w3.weight": (f, d), "feed_forward.w2.weight": (d, f),
            "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}[_short(name)]

  def _shard_shape(self, name: str) -> tuple[int, ...]:
    shape, axis = list(self._full_shape(name)), self._axis(name)
    if self.kv_replicas > 1 and _short(name) in _KV:
      shape[0] = self.config.head_dim
    elif axis is not None:
      shape[axis] //= len(self.shards)
    return tuple(shape)

  def _check_replicas(self):
    # Meta's resharding (llama_models.checkpoint) gives shard s head
    # s // replicas; a layout that tiles heads instead would load silently
    # wrong, so the first row of every replica must agree.
    for name in ("layers.0." + n for n in _KV):
      for s, (file, shard) in enumerate(zip(self.files, self.shards)):
        first = self.shards[s - s % self.kv_replicas][name]
        if s % self.kv_replicas and not np.array_equal(
            shard[name].read((slice(0, 1),)).view(np.uint8),
            first.read((slice(0, 1),)).view(np.uint8)):
          raise CheckpointError(
              f"{file}: {name} differs from its replica in "
              f"{self.files[s - s % self.kv_replicas].name}; with "
              f"n_kv_heads={self.config.num_key_value_heads} over "
              f"{len(self.shards)} shards Meta stores each kv head on "
              f"{self.kv_replicas} consecutive shards, and these files do not")

  def read(self, name: str, index: tuple) -> np.ndarray:
    """Meta's whole tensor `name` at `index` (slices in its [out, in]
    order), read from the shards that hold that part, with q and k rows
    in the half-split rotary layout."""
    full = self._full_shape(name)
    index = [e if isinstance(e, slice) else slice(e, e + 1) for e in index]
    index += [slice(None)] * (len(full) - len(index))
    index = [np.arange(*s.indices(n)) for s, n in zip(index, full)]
    c, short = self.config, _short(name)
    heads = {"attention.wq.weight": c.num_attention_heads,
             "attention.wk.weight": c.num_key_value_heads}.get(short)
    if heads:
      index[0] = _rotary_rows(heads, c.head_dim)[index[0]]
    axis, tensors = self._axis(name), [s[name] for s in self.shards]
    if axis is None or len(tensors) == 1:
      return tensors[0].read(tuple(index))
    wanted = index[axis]
    if self.kv_replicas > 1 and short in _KV:
      shard = wanted // c.head_dim * self.kv_replicas
      local = wanted % c.head_dim
    else:
      per = tensors[0].shape[axis]
      shard, local = wanted // per, wanted % per
    out = np.empty([len(e) for e in index], tensors[0].dtype)
    for s in np.unique(shard):
      sel = np.flatnonzero(shard == s)
      part = tensors[s].read(tuple(index[:axis] + [local[sel]]
                                   + index[axis + 1:]))
      out[(slice(None),) * axis + (sel,)] = part
    return out


def _short(name: str) -> str:
  """A layer tensor's name without its `layers.N.`."""
  return name.split(".", 2)[2] if name.startswith("layers.") else name


@functools.cache
def _rotary_rows(heads: int, head_dim: int) -> np.ndarray:
  """Meta's row for each of our q/k rows: Meta keeps each rotary pair
  (x_2i, x_2i+1) side by side within a head; our rotate-half RoPE pairs
  row i with row i + head_dim / 2. So our row h*H + j*H/2 + i is Meta's
  h*H + 2i + j."""
  meta = np.arange(heads * head_dim).reshape(heads, head_dim // 2, 2)
  return meta.transpose(0, 2, 1).reshape(-1)
