"""Adapters made by PEFT itself, and in the official LongLoRA release's
layout, from a tiny HF Llama on disk: the independent side of the PEFT tests."""

import jax
import transformers

from longlora_jax.model import lora
from tests.references import hf_models
from tests.references.hf_models import peft, torch  # None without PyTorch

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
PREFIX = "base_model.model."


def torch_base(directory, **kwargs):
  hf_models.require("torch", "peft")
  # A fresh copy: PEFT wraps the model it is given in place. Auto: the
  # class of the family the directory's config.json names.
  return transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, **kwargs).eval()


def trained(params, seed=0):
  """LoRA+ params as after training: non-zero b, changed embedding and norms."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for k, (path, x) in zip(keys, leaves):
    name = lora._path_name(path)
    if name.endswith("/b"):
      x = 0.3 * jax.random.normal(k, x.shape, x.dtype)
    elif "norm" in name or "embed" in name:
      x = x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
    out.append(x)
  return treedef.unflatten(out)


def peft_adapter(directory, out, *, r=4, alpha=8, seed=0, target_modules=ATTN,
                 **lora_kwargs):
  """An adapter made by PEFT itself, with random lora_B (and changed
  modules_to_save copies); returns the PyTorch logits it gives."""
  hf_models.require("torch", "peft")
  torch.manual_seed(seed)
  model = peft.get_peft_model(torch_base(directory), peft.LoraConfig(
      r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0,
      **lora_kwargs))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
      elif "modules_to_save" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(out)
  return model


def official_adapter(directory, out, *, prefixed=False, seed=0, new_tokens=0,
                      peft_saves=False):
  """The official LongLoRA layout, written as its get_trainable_weights.py
  does: LoRA factors in adapter_model.bin ("default." dropped), embed and
  norm weights in trainable_params.bin with `base_model.model.` cut off.
  `new_tokens`: grow the vocabulary first as its fine-tune.py does (new
  input and output rows = the mean of the old ones). `peft_saves`: the
  adapter as its save_callback.py writes it with today's PEFT instead,
  `model.save_pretrained`, which adds a resized embedding and lm_head."""
  hf_models.require("torch", "peft")
  torch.manual_seed(seed)
  base = torch_base(directory)
  if new_tokens:
    vocab = base.config.vocab_size
    base.resize_token_embeddings(vocab + new_tokens)
    with torch.no_grad():
      for emb in (base.get_input_embeddings().weight,
                  base.get_output_embeddings().weight):
        emb[vocab:] = emb[:vocab].mean(dim=0, keepdim=True)
  model = peft.get_peft_model(base, peft.LoraConfig(
      r=4, lora_alpha=16, target_modules=ATTN, lora_dropout=0.0))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
      elif "embed" in name or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  state = model.state_dict()
  if peft_saves:
    model.save_pretrained(out)
  else:
    model.peft_config["default"].save_pretrained(out)
    torch.save({k.replace("default.", ""): v for k, v in state.items()
                if "lora" in k}, out / "adapter_model.bin")
  torch.save({(k if prefixed else k[len(PREFIX):]): v
              for k, v in state.items()
              if "lora" not in k and ("embed" in k or "norm" in k)},
             out / "trainable_params.bin")
  return model
