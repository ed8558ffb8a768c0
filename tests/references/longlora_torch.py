"""The official LongLoRA training recipe in PyTorch, written from its code
(github.com/dvlab-research/LongLoRA: llama_attn_replace.py's
`forward_noflashattn`, fine-tune.py): the side-by-side benchmark's "theirs"
and an independent reference for our S²-Attn.

Independent of longlora_jax on purpose. Today's transformers calls an
attention function registered by name where the official code replaced
`LlamaAttention.forward`; the projections and RoPE around it are
transformers' own, so `s2_attention` is the part that differs.
"""

import math
import warnings

import torch
import transformers
from transformers.models.llama.modeling_llama import repeat_kv

S2 = "longlora_s2"
GROUP_SIZE_RATIO = 1 / 4  # the official `group_size_ratio`
TRAINABLE = ("embed", "norm")  # fine-tune.py's default `trainable_params`
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def s2_attention(module, query, key, value, attention_mask=None,
                 scaling=None, dropout=0.0, **kwargs):
  """`forward_noflashattn`'s attention: `query` `[batch, heads, seq,
  head_dim]` and `key`, `value` `[batch, kv_heads, seq, head_dim]` after
  RoPE, which it overwrites, as the official code does (transformers
  uses them no more); returns (`[batch, seq, heads, head_dim]`, None).

  The second half of the heads (from heads // 2) is rolled by -G/2 along
  the sequence, the sequence cut into groups of G = seq / 4 with causal
  attention inside each, and the output rolled back: the paper's
  Algorithm 1, whose last shifted group wraps around. Groups are never
  padded, so the causal G x G mask stands for the official
  `attention_mask[:, :, :G, :G]`.
  """
  del attention_mask, scaling, dropout, kwargs
  bsz, num_heads, q_len, head_dim = query.shape
  group_size = int(q_len * GROUP_SIZE_RATIO)
  if q_len % group_size > 0:
    raise ValueError("q_len %d should be divisible by group size %d."
                     % (q_len, group_size))
  num_group = q_len // group_size
  key = repeat_kv(key, num_heads // key.shape[1])
  value = repeat_kv(value, num_heads // value.shape[1])

  def shift(qkv):  # in place, as the official code does
    qkv[:, num_heads // 2:] = qkv[:, num_heads // 2:].roll(
        -group_size // 2, dims=2)
    return qkv.transpose(1, 2).reshape(
        bsz * num_group, group_size, num_heads, head_dim).transpose(1, 2)

  query, key, value = shift(query), shift(key), shift(value)
  attn_weights = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(
      head_dim)
  mask = torch.full((group_size, group_size), torch.finfo(query.dtype).min,
                    dtype=query.dtype).triu(1)
  attn_weights = attn_weights + mask
  # The official code upcasts the softmax to float32.
  attn_weights = torch.nn.functional.softmax(
      attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
  attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
  attn_output = attn_output.reshape(bsz, q_len, num_heads, head_dim)
  attn_output[:, :, num_heads // 2:] = attn_output[:, :, num_heads // 2:].roll(
      group_size // 2, dims=1)
  return attn_output, None


transformers.AttentionInterface.register(S2, s2_attention)


def recipe_model(directory, *, s2: bool, rank: int = 8, alpha: float = 16):
  """The model fine-tune.py trains, float32: PEFT LoRA (`rank`, `alpha`,
  no dropout) on q, k, v, o; every parameter named embed or norm trained
  too (LoRA+; lm_head frozen); no cache; gradient checkpointing per layer.
  S²-Attn with `s2`, else transformers' default attention (sdpa)."""
  import peft
  model = transformers.LlamaForCausalLM.from_pretrained(
      directory, dtype=torch.float32,
      **({"attn_implementation": S2} if s2 else {}))
  with warnings.catch_warnings():  # v5 renames gradient_checkpointing_*
    warnings.simplefilter("ignore", FutureWarning)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0,
        bias="none", task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
      if any(k in name for k in TRAINABLE):
        p.requires_grad_()
    model.config.use_cache = False
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable()
  model.train()
  return model


def optimizer(model, lr: float = 2e-5):
  """HF Trainer's AdamW at the official settings (no weight decay)."""
  return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                           lr=lr, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=0.0)


def train_step(model, opt, input_ids, max_grad_norm: float = 1.0) -> float:
  """One step as HF Trainer takes it: causal LM loss on `input_ids`
  `[batch, seq]`, backward, gradient clipping, AdamW; returns the loss."""
  loss = model(input_ids=input_ids, labels=input_ids).loss
  loss.backward()
  torch.nn.utils.clip_grad_norm_(
      [p for p in model.parameters() if p.requires_grad], max_grad_norm)
  opt.step()
  opt.zero_grad(set_to_none=True)
  return loss.item()
