"""python -m train.extend end to end on a tiny model (8 virtual CPU devices)."""

import json
import os
import shutil
import signal

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from longlora_jax import LongLoraError, forward
from longlora_jax.demo.base import save_byte_tokenizer
from longlora_jax.training import loop
from longlora_jax.training.export import load_run
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch
from train import export, extend
from tests.conftest import run_commands

# Native context 32, extended to 64 (RoPE x2): S²-Attn groups of 16.
TINY = dict(vocab_size=259, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
WORDS = "the grass is green the sky is blue here we go there and back".split()


def _model(directory, seed=0):
  hf_models.save_hf_llama(directory, TINY, seed=seed)
  save_byte_tokenizer(directory)
  return directory


def _data(path, n_docs, seed=0):
  rng = np.random.default_rng(seed)
  path.write_text("".join(json.dumps(
      {"text": " ".join(rng.choice(WORDS, rng.integers(3, 30)))}) + "\n"
      for _ in range(n_docs)))
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("extend")
  return {"model": _model(d / "model"), "other": _model(d / "other", seed=1),
          # About 2,300 tokens: 36 rows of 64, so 6 steps of 8 rows run
          # into a second pass over the data.
          "data": _data(d / "docs.jsonl", 40), "tmp": d}


def _args(files, out, *extra):
  return ["--ckpt", str(files["model"]), "--ctx", "64", "--data",
          str(files["data"]), "--out", str(out), "--dtype", "float32",
          "--lr", "1e-2", "--warmup", "2", "--accum", "1", *extra]


def _metrics(run):
  return [json.loads(line) for line in (run / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def run(files):
  out = files["tmp"] / "run"
  assert extend.main(_args(files, out, "--steps", "8", "--save-every",
                           "3")) == 0
  return out


def test_trains_checkpoints_and_exports(run, files):
  losses = [m["loss"] for m in _metrics(run)]
  assert [m["step"] for m in _metrics(run)] == list(range(1, 9))
  assert np.mean(losses[-2:]) < losses[0] - 0.3
  assert sorted(os.listdir(run / "checkpoints")) == ["6", "8"]  # keep 2
  assert (run / "loss.png").stat().st_size > 0
  spec = json.loads((run / "run.json").read_text())
  assert (spec["mode"], spec["recipe"]["attention"]["kind"], spec["ctx"]) == (
      "lora+", "s2", 64)
  config = json.loads((run / "hf" / "config.json").read_text())
  assert config["rope_scaling"]["factor"] == 2.0
  assert config["max_position_embeddings"] == 32

  # The merged export, read by transformers, is the model that trained:
  # our forward of the run's parameters with their LoRA nodes.
  _, _, ext_config, params, step = load_run(run)
  assert step == 8
  ids = hf_models.random_ids(259, 2, 64, seed=3)
  ours = np.asarray(forward(ext_config, params, ids))
  hf = AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32)
  np.testing.assert_allclose(hf_models.hf_logits(hf, ids), ours, atol=1e-4,
                             rtol=1e-4)
  tok = AutoTokenizer.from_pretrained(run / "hf")
  out = hf.generate(**tok("the sky is", return_tensors="pt"),
                    max_new_tokens=5, do_sample=False)
  assert out.shape[1] == len(tok("the sky is")["input_ids"]) + 5

  # The PEFT adapter on the base model (with the same RoPE scaling).
  from peft import PeftModel
  base = AutoModelForCausalLM.from_pretrained(
      files["model"], dtype=torch.float32,
      rope_scaling={"type": "linear", "rope_type": "linear", "factor": 2.0,
                    "rope_theta": 10000.0})
  peft = PeftModel.from_pretrained(base, run / "peft")
  np.testing.assert_allclose(hf_models.hf_logits(peft, ids), ours, atol=1e-4,
                             rtol=1e-4)


def test_the_printed_peft_hint_gives_the_merged_models_logits(run, files):
  # Run as printed, with nothing defined around it: the base model is the
  # one recorded in the adapter (the run's --ckpt, not "demo" or a name
  # that sends PEFT to the Hub).
  from longlora_jax.training.export import describe
  _, _, config, _, _ = load_run(run)
  printed = describe({"peft": run / "peft"}, config).splitlines()
  hint = [line[2:] for line in printed if line.startswith("  ")]
  assert hint[:2] == ["import torch",
                      "from peft import AutoPeftModelForCausalLM"]
  scope = {}
  exec("\n".join(hint), scope)
  adapter = json.loads((run / "peft" / "adapter_config.json").read_text())
  assert adapter["base_model_name_or_path"] == str(files["model"])
  merged = AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32)
  ids = hf_models.random_ids(259, 2, 64, seed=5)
  np.testing.assert_allclose(hf_models.hf_logits(scope["model"], ids),
                             hf_models.hf_logits(merged, ids), atol=1e-4,
                             rtol=1e-4)


class _StopAt:
  """A tqdm stand-in that sends this process SIGTERM after step `n`."""

  def __init__(self, n):
    self.n_stop, self.tqdm = n, loop.tqdm

  def __call__(self, *args, **kwargs):
    bar = self.tqdm(*args, **kwargs)
    update, n_stop = bar.update, self.n_stop

    def stopping_update(k=1):
      update(k)
      if bar.n == n_stop:
        os.kill(os.getpid(), signal.SIGTERM)
    bar.update = stopping_update
    return bar


@pytest.mark.parametrize("offload", ["none", "optimizer"])  # host moments
def test_interrupted_and_resumed_equals_uninterrupted(files, monkeypatch,
                                                      capsys, offload):
  whole, parts = (files["tmp"] / f"{p}_{offload}" for p in ("whole", "parts"))
  args = lambda out: _args(files, out, "--steps", "6", "--offload", offload)
  assert extend.main(args(whole)) == 0
  monkeypatch.setattr(loop, "tqdm", _StopAt(3))
  assert extend.main(args(parts)) == 128 + signal.SIGTERM
  assert "resume with: python -m train.extend --resume" in capsys.readouterr().out
  assert sorted(os.listdir(parts / "checkpoints")) == ["3"]
  assert not (parts / "hf").exists()
  monkeypatch.undo()
  assert extend.main(["--resume", "--out", str(parts)]) == 0
  assert [m["step"] for m in _metrics(parts)] == list(range(1, 7))
  for name in ("hf/model.safetensors", "peft/adapter_model.safetensors"):
    assert (whole / name).read_bytes() == (parts / name).read_bytes(), name
  np.testing.assert_array_equal([m["loss"] for m in _metrics(whole)],
                                [m["loss"] for m in _metrics(parts)])


def test_bad_input_is_one_line_and_writes_nothing(files, run, tiny_hf):
  qwen2, _ = tiny_hf("qwen2_yarn")  # heads x head_dim != hidden size
  tmp = files["tmp"] / "bad"
  tmp.mkdir()
  (tmp / "empty").mkdir()
  (tmp / "no_weights").mkdir()
  for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    shutil.copy(files["model"] / f, tmp / "no_weights" / f)
  (tmp / "short.jsonl").write_text('{"text": "the sky"}\n{"text": "is blue"}\n')
  model, data = str(files["model"]), str(files["data"])
  out = lambda name: ["--out", str(tmp / f"out_{name}")]
  cases = {
      "hub": (["--ckpt", "hf:nobody/nothing", "--ctx", "64", *out("hub")],
              "hf:nobody/nothing is not in the local Hugging Face cache"),
      "no_config": (["--ckpt", str(tmp / "empty"), "--ctx", "64",
                     *out("no_config")], "config.json: not found"),
      "no_weights": (["--ckpt", str(tmp / "no_weights"), "--ctx", "64",
                      "--data", data, *out("no_weights")], "no weights found"),
      "short_ctx": (["--ckpt", model, "--ctx", "32", *out("short_ctx")],
                    "--ctx 32 is not larger than the checkpoint's context of "
                    "32 tokens"),
      "groups": (["--ckpt", model, "--ctx", "100", *out("groups")],
                 "--ctx 100 does not split into S²-Attn groups of 0.25 x ctx "
                 "tokens (an even group size that divides the context); "
                 "nearest valid: 96 or 104"),
      "no_data": (["--ckpt", model, "--ctx", "64", "--data",
                   str(tmp / "nope.jsonl"), *out("no_data")],
                  "nope.jsonl: no such file or directory"),
      "little_data": (["--ckpt", model, "--ctx", "64", "--data",
                       str(tmp / "short.jsonl"), *out("little_data")],
                      "short.jsonl yields 18 tokens, fewer than one row of 64"),
      "other_model": (["--resume", "--out", str(run), "--ckpt",
                       str(files["other"])], f"{run} is a run of --ckpt"),
      "other_ctx": (["--resume", "--out", str(run), "--ctx", "128"],
                    f"{run} extends to --ctx 64, not 128"),
      "pallas_on_cpu": (["--ckpt", model, "--ctx", "64", "--s2-impl",
                         "pallas", *out("pallas_on_cpu")],
                        "--s2-impl pallas needs an NVIDIA GPU; use --s2-impl "
                        "auto (or dense, chunked)"),
      "impl_full": (["--ckpt", model, "--ctx", "64", "--full-attn",
                     "--s2-impl", "dense", *out("impl_full")],
                    "--s2-impl chooses how S²-Attn runs; drop it with "
                    "--full-attn"),
      "offload_dots": (["--ckpt", model, "--ctx", "64", "--offload",
                        "activations", "--remat", "dots",
                        *out("offload_dots")],
                       "--offload activations moves what --remat full keeps "
                       "to the host; it needs --remat full, not dots"),
      "gguf": (["--ckpt", str(qwen2), "--ctx", "256", "--data", data,
                "--gguf", "f16", *out("gguf")],
               "llama.cpp's qwen2 needs heads x head_dim == hidden_size"),
      "original_ctx": (["--ckpt", model, "--ctx", "64", "--original-ctx",
                        "16", *out("original_ctx")],
                       "--original-ctx is for a checkpoint in Meta's layout"),
      "nan": ([*_args(files, tmp / "nan", "--lr", "1e30", "--warmup", "0",
                      "--save-every", "1", "--steps", "5")],
              "at step 2: training stopped; the last good checkpoint is step 1"),
  }
  before = sorted(p.relative_to(run) for p in run.rglob("*"))
  stamp = (run / "run.json").stat().st_mtime_ns
  results = run_commands({name: ("train.extend", args)
                          for name, (args, _) in cases.items()})
  for name, (_, message) in cases.items():
    code, stderr = results[name]
    assert code == 2, (name, stderr)
    lines = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], (name, stderr)
    assert "Traceback" not in stderr, name
    if name not in ("nan", "other_model", "other_ctx"):
      assert not (tmp / f"out_{name}").exists(), name
  assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
  assert (run / "run.json").stat().st_mtime_ns == stamp
  # A NaN keeps the last good checkpoint and writes no model.
  assert sorted(os.listdir(tmp / "nan" / "checkpoints")) == ["1"]
  assert sorted(p.name for p in (tmp / "nan").iterdir()) == [
      "checkpoints", "metrics.jsonl", "run.json"]


def test_export_any_saved_step(run, files):
  out = files["tmp"] / "step6"
  export.main(["--run", str(run), "--step", "6", "--out", str(out)])
  config = json.loads((out / "config.json").read_text())
  assert config["rope_scaling"]["factor"] == 2.0
  # Step 6's weights: not the final (step 8) model's.
  hf6 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  hf8 = AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32)
  ids = hf_models.random_ids(259, 1, 64, seed=4)
  _, _, ext_config, params6, _ = load_run(run, 6)
  np.testing.assert_allclose(hf_models.hf_logits(hf6, ids),
                             np.asarray(forward(ext_config, params6, ids)),
                             atol=1e-4, rtol=1e-4)
  assert not np.allclose(hf_models.hf_logits(hf6, ids),
                         hf_models.hf_logits(hf8, ids), atol=1e-3)
  export.main(["--run", str(run), "--out", str(files["tmp"] / "peft8"),
               "--format", "peft"])
  assert (files["tmp"] / "peft8" / "adapter_model.safetensors").read_bytes() \
      == (run / "peft" / "adapter_model.safetensors").read_bytes()
  with pytest.raises(LongLoraError, match="no checkpoint of step 7; saved: 6, 8"):
    export.main(["--run", str(run), "--step", "7", "--out",
                 str(files["tmp"] / "step7")])
  with pytest.raises(LongLoraError, match="exists and is not empty"):
    export.main(["--run", str(run), "--out", str(out)])
  assert not (files["tmp"] / "step7").exists()


def test_offloaded_run_says_so_and_records_it(files, capsys):
  out = files["tmp"] / "offload"
  assert extend.main(_args(files, out, "--steps", "1", "--remat", "full",
                           "--offload", "activations")) == 0
  captured = capsys.readouterr()
  assert "S²-Attn, activations offloaded to host, " in captured.out
  assert "extend (offload)" in captured.err  # the progress bar
  spec = json.loads((out / "run.json").read_text())
  assert spec["recipe"]["offload"] == "activations"


def test_gguf_at_the_end_of_a_run_and_from_export(files, capsys):
  import gguf
  from safetensors.numpy import load_file
  out = files["tmp"] / "gguf"
  assert extend.main(_args(files, out, "--steps", "1", "--gguf", "f16")) == 0
  assert f"GGUF (llama.cpp, context 64): {out / 'model-f16.gguf'}" in (
      capsys.readouterr().out)
  assert json.loads((out / "run.json").read_text())["gguf"] == "f16"
  reader = gguf.GGUFReader(out / "model-f16.gguf")
  fields = {k: f.contents() for k, f in reader.fields.items()}
  assert (fields["llama.context_length"], fields["llama.rope.scaling.type"],
          fields["llama.rope.scaling.factor"]) == (64, "linear", 2.0)
  # The merged model's embedding (trained: LoRA+), as transformers holds it.
  hf = load_file(out / "hf" / "model.safetensors")
  got = {t.name: np.asarray(t.data) for t in reader.tensors}
  np.testing.assert_array_equal(got["token_embd.weight"], hf[
      "model.embed_tokens.weight"].astype(np.float16))
  # train.export of the same checkpoint writes the same tensors.
  export.main(["--run", str(out), "--out", str(files["tmp"] / "gguf_export"),
               "--format", "gguf"])
  again = gguf.GGUFReader(files["tmp"] / "gguf_export" / "model-f16.gguf")
  assert sorted(got) == sorted(t.name for t in again.tensors)
  for t in again.tensors:
    np.testing.assert_array_equal(np.asarray(t.data), got[t.name], t.name)
  # A type llama.cpp has no name for: one line, before anything runs (the
  # same choices as train.extend's --gguf: test_options).
  with pytest.raises(SystemExit, match="2"):
    export.main(["--run", str(out), "--out", str(files["tmp"] / "gguf_bad"),
                 "--format", "gguf", "--gguf-type", "q4"])
  assert "invalid choice: 'q4'" in capsys.readouterr().err
  assert not (files["tmp"] / "gguf_bad").exists()


def _meta_llama2_hub(root):
  """A tiny Llama 2 in Meta's original layout (params.json,
  consolidated.00.pth, a SentencePiece tokenizer.model), cached offline as
  the Hub repo meta-llama/Llama-2-7b is laid out in `root`/hub."""
  import sentencepiece as spm
  repo = root / "hub" / "models--meta-llama--Llama-2-7b"
  snapshot = repo / "snapshots" / "0123abcd"
  snapshot.mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0123abcd")
  spm.SentencePieceTrainer.train(
      input=str(_data(root / "corpus.jsonl", 50)),
      model_prefix=str(root / "sp"), vocab_size=64,
      model_type="bpe", byte_fallback=False, bos_id=1, eos_id=2, unk_id=0,
      minloglevel=2)
  shutil.copy(root / "sp.model", snapshot / "tokenizer.model")
  params = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5,
                vocab_size=-1)
  (snapshot / "params.json").write_text(json.dumps(params))
  gen = torch.Generator().manual_seed(0)
  rand = lambda *shape: 0.3 * torch.randn(*shape, generator=gen)
  dim, ffn, vocab = 64, 192, 64  # Meta's FeedForward: 2/3 x 4 x 64 -> 192
  state = {"tok_embeddings.weight": rand(vocab, dim),
           "norm.weight": 1 + rand(dim) / 3, "output.weight": rand(vocab, dim),
           "rope.freqs": torch.ones(8)}
  for i in range(2):
    layer = f"layers.{i}."
    state.update({
        **{f"{layer}attention.w{x}.weight": rand(dim, dim) for x in "qkvo"},
        f"{layer}feed_forward.w1.weight": rand(ffn, dim),
        f"{layer}feed_forward.w2.weight": rand(dim, ffn),
        f"{layer}feed_forward.w3.weight": rand(ffn, dim),
        f"{layer}attention_norm.weight": 1 + rand(dim) / 3,
        f"{layer}ffn_norm.weight": 1 + rand(dim) / 3})
  torch.save(state, snapshot / "consolidated.00.pth")
  return snapshot


def test_design_card_command_on_metas_release(tmp_path, monkeypatch):
  # The design card's command, as a user types it, on Meta's release of
  # Llama 2 (no config.json: its context comes from what the files say).
  import gguf
  import subprocess
  import sys
  from huggingface_hub import constants
  from tests.conftest import ROOT
  hf_models.require("torch", "sentencepiece")
  _meta_llama2_hub(tmp_path / "hf_home")
  data = _data(tmp_path / "docs.jsonl", 12000)  # ~100,000 tokens and more
  out = tmp_path / "run"
  env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf_home" / "hub"),
         "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  done = subprocess.run(
      [sys.executable, "-m", "train.extend", "--ckpt",
       "hf:meta-llama/Llama-2-7b", "--ctx", "100000",
       # One step of one row on one CPU device; S²-Attn groups of 400
       # tokens keep a 100,000-token row quick.
       "--steps", "1", "--batch", "1", "--accum", "1", "--group-ratio",
       "0.004", "--remat", "none", "--dtype", "float32", "--data", str(data),
       "--out", str(out)], cwd=ROOT, env=env, text=True, capture_output=True,
      timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "original context 4096 tokens: Llama 2" in done.stdout
  assert ("context 4096 -> 100000 (RoPE linear factor 25)" in done.stdout)
  assert json.loads((out / "run.json").read_text())["base_config"][
      "max_position_embeddings"] == 4096
  # The merged model stands alone: no base repo is needed to load it.
  hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
  assert hf.config.rope_scaling["factor"] == 25.0
  tok = AutoTokenizer.from_pretrained(out / "hf")
  assert tok("the sky is")["input_ids"][0] == 1  # Llama 2's <s>
  for name in ("adapter_config.json", "adapter_model.safetensors"):
    assert (out / "peft" / name).stat().st_size > 0
  # And out as GGUF, its SentencePiece vocabulary from Meta's tokenizer.model.
  monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
  export.main(["--run", str(out), "--out", str(tmp_path / "gguf"),
               "--format", "gguf"])
  fields = {k: f.contents() for k, f in gguf.GGUFReader(
      tmp_path / "gguf" / "model-f16.gguf").fields.items()}
  # Its context is the factor's: 25 x 4096 >= 100000.
  assert (fields["llama.context_length"], fields["llama.rope.scaling.factor"],
          fields["tokenizer.ggml.model"]) == (102400, 25.0, "llama")


def test_original_ctx_is_the_runs_and_resume_opens_it_so(tmp_path):
  from longlora_jax.training import run as engine
  from longlora_jax.training.recipe import write_spec
  from longlora_jax.training.tasks import EXTEND
  hf_models.require("torch", "sentencepiece")
  snapshot = _meta_llama2_hub(tmp_path)
  data, out = _data(tmp_path / "docs.jsonl", 10), tmp_path / "run"
  given = {"ckpt": str(snapshot), "ctx": 64, "original_ctx": 16,
           "data": str(data)}
  spec, base = engine.prepare(given, task=EXTEND, resume=False, run_dir=out)
  assert (spec.original_ctx, base.config.context) == (16, 16)
  assert "original context 16 tokens: as given" in base.note
  out.mkdir()
  write_spec(out, spec)
  resumed, base = engine.prepare({}, task=EXTEND, resume=True, run_dir=out)
  assert (resumed, base.config.context) == (spec, 16)
  with pytest.raises(LongLoraError, match="--original-ctx 32 differs from "
                     "this run's 16"):
    engine.prepare({"original_ctx": 32}, task=EXTEND, resume=True,
                   run_dir=out)
