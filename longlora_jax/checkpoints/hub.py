"""Where a checkpoint lives: a local directory, `hf:ORG/NAME[@revision]`
through the Hugging Face cache (honours HF_HOME and HF_HUB_OFFLINE), or a
checkpoint the package ships (`demo`)."""

import os
from pathlib import Path

from longlora_jax.core.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja")
# Checkpoints shipped as package data: the demo's tiny pretrained Llama,
# written by `python -m train.pretrain_demo`.
BUILTIN = {"demo": Path(__file__).parent / "builtin" / "demo"}
# Meta's own release layout (checkpoints.meta), at the top or in original/:
# fetched from a Hub repo that has no Hugging Face weights.
META_FILES = ("*.pth", "*params.json", "*tokenizer.model")


def resolve_checkpoint(spec: str | os.PathLike,
                       patterns: tuple[str, ...] = ("*.json", "*.safetensors",
                                                    *TOKENIZER_FILES)) -> Path:
  """A local directory for `spec`: a path, `hf:ORG/NAME[@revision]`, or a
  name in BUILTIN.

  Hub ids go through huggingface_hub's cache (honours HF_HOME and
  HF_HUB_OFFLINE). Safetensors are fetched; `.bin` weights only when the repo
  has no safetensors; Meta's layout (META_FILES) when it has neither.
  """
  spec = str(spec)
  if spec in BUILTIN:
    path = BUILTIN[spec]
    if not (path / "model.safetensors").exists():
      raise CheckpointError(
          f"{path}: the {spec} base model is missing; rebuild it with "
          "`python -m train.pretrain_demo`")
    return path
  if not spec.startswith("hf:"):
    path = Path(spec).expanduser()
    if not path.is_dir():
      raise CheckpointError(
          f"{spec}: no such directory; pass a local Hugging Face checkpoint "
          "directory or hf:ORG/NAME")
    return path
  repo, _, revision = spec[3:].partition("@")
  path = _snapshot(repo, revision or None, patterns)
  if "*.safetensors" in patterns and not any(path.glob("*.safetensors")):
    path = _snapshot(repo, revision or None, (*patterns, "*.bin"))
    if not any(path.glob("*.bin")):
      path = _snapshot(repo, revision or None, (*patterns, *META_FILES))
  return path


def _snapshot(repo: str, revision: str | None, patterns) -> Path:
  from huggingface_hub import constants, errors, snapshot_download
  fetch = (f"fetch it where the Hub is reachable with `hf download {repo}` "
           "(gated repos such as meta-llama need `hf auth login` first) and "
           "copy the cache, or pass a local checkpoint directory")
  try:
    return Path(snapshot_download(repo, revision=revision,
                                  allow_patterns=list(patterns)))
  except errors.GatedRepoError:
    raise CheckpointError(f"hf:{repo} is gated: accept its license on "
                          "huggingface.co, run `hf auth login`, then retry") from None
  except errors.RepositoryNotFoundError:
    raise CheckpointError(f"hf:{repo}: no such repository on the Hugging Face "
                          "Hub (private repos need `hf auth login`)") from None
  except errors.RevisionNotFoundError:
    raise CheckpointError(f"hf:{repo}: no revision {revision!r}") from None
  except (errors.LocalEntryNotFoundError, OSError):
    where = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
             else "the Hub cannot be reached")
    raise CheckpointError(
        f"hf:{repo} is not in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {where}: {fetch}") from None
