import pytest

from longlora_jax.core import cli
from longlora_jax.core.errors import LongLoraError


def _parser():
  p = cli.Parser("A command.\n\n  python -m x --n 3\n")
  p.add_argument("--n", type=cli.count, default=4, help="how many")
  p.add_argument("--lr", type=cli.positive)
  p.add_argument("--ratio", type=cli.fraction, default=0.25)
  p.add_argument("--beta", type=cli.real(0.0, 1.0, high_open=True))
  p.add_argument("--seed", type=cli.index, default=0)
  p.add_argument("--lens", type=cli.integer(2), nargs="+", default=[8, 16])
  p.add_argument("--ctx", type=cli.integer(64, tokens=True))
  p.add_argument("--out", default="runs/x")
  return p


@pytest.mark.parametrize("args,message", [
    (["--n", "0"], "argument --n: '0' is not an integer >= 1"),
    (["--n", "-5"], "argument --n: '-5' is not an integer >= 1"),
    (["--n", "2.5"], "argument --n: '2.5' is not an integer >= 1"),
    (["--lr", "nan"], "argument --lr: 'nan' is not a finite number > 0"),
    (["--lr", "inf"], "argument --lr: 'inf' is not a finite number > 0"),
    (["--lr", "-1"], "argument --lr: '-1' is not a finite number > 0"),
    (["--lr", "0"], "argument --lr: '0' is not a finite number > 0"),
    (["--ratio", "1.5"], "argument --ratio: '1.5' is not a finite number in "
                         "(0, 1]"),
    (["--beta", "1"], "argument --beta: '1' is not a finite number in [0, 1)"),
    (["--seed", "-1"], "argument --seed: '-1' is not an integer >= 0"),
    (["--lens", "8", "1"], "argument --lens: '1' is not an integer >= 2"),
    (["--ctx", "0.01k"], "argument --ctx: '0.01k' is not an integer >= 64 "
                         "(e.g. 4096 or 4k)"),
    (["--ctx", "nank"], "argument --ctx: 'nank' is not an integer >= 64 "
                        "(e.g. 4096 or 4k)"),
    (["--ctx", "1e3"], "argument --ctx: '1e3' is not an integer >= 64 "
                       "(e.g. 4096 or 4k)"),
    (["--nope"], "unrecognized arguments: --nope"),
])
def test_a_bad_option_is_one_line_and_exit_code_2(args, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    _parser().parse_args(args)
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err == f"error: {message} (see --help)\n"


def test_good_values_pass():
  args = _parser().parse_args(["--n", "3", "--lr", "1e-5", "--ratio", "1",
                               "--beta", "0", "--seed", "0", "--lens", "2"])
  assert (args.n, args.lr, args.ratio, args.beta, args.seed, args.lens) == (
      3, 1e-5, 1.0, 0.0, 0, [2])
  # RULER's names for lengths: k is 1024 tokens.
  assert [_parser().parse_args(["--ctx", text]).ctx for text in (
      "4k", "128K", "0.75k", "100000")] == [4096, 131072, 768, 100000]


def test_help_shows_the_description_as_written_and_defaults(capsys):
  with pytest.raises(SystemExit):
    _parser().parse_args(["--help"])
  out = capsys.readouterr().out
  assert "  python -m x --n 3\n" in out
  assert "how many (default: 4)" in out
  assert "(default: 0.25)" in out and "(default: runs/x)" in out
  assert "(default: 8 16)" in out
  # No default, nothing said.
  assert "default: None" not in out


def test_option_adds_a_shared_option_with_a_commands_default_and_purpose(
    capsys):
  p = cli.Parser("A command.")
  cli.option(p, "--dtype", default="float32", purpose="the scored model")
  cli.option(p, "--mesh")
  cli.option(p, "--heads", default=4)
  assert vars(p.parse_args([])) == {"dtype": "float32", "mesh": "fsdp=-1",
                                    "heads": 4}
  # The shared choices and type stay.
  assert p.parse_args(["--dtype", "float16"]).dtype == "float16"
  with pytest.raises(SystemExit):
    p.parse_args(["--dtype", "int8"])
  assert "argument --dtype: invalid choice: 'int8'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    p.parse_args(["--heads", "0"])
  assert "argument --heads: '0' is not an integer >= 1" in (
      capsys.readouterr().err)
  with pytest.raises(SystemExit):
    p.parse_args(["--help"])
  out = " ".join(capsys.readouterr().out.split())
  assert "the scored model: weights and compute (default: float32)" in out
  assert "query heads (default: 4)" in out
  # Another command's parser gets the shared default, not this one's.
  q = cli.Parser("Another.")
  cli.option(q, "--dtype")
  cli.option(q, "--heads")
  assert vars(q.parse_args([])) == {"dtype": "bfloat16", "heads": 32}


def test_no_command_declares_a_shared_option_itself():
  # Each shared option is declared once, in cli.OPTIONS: a command adds it
  # with cli.option.
  from tests.test_layout import _commands
  for name, path in _commands().items():
    text = path.read_text()
    for option in cli.OPTIONS:
      assert f'add_argument("{option}"' not in text, (name, option)


def test_run_turns_a_user_error_into_one_line(capsys):
  def main():
    raise LongLoraError("--x is wrong; use --y")
  with pytest.raises(SystemExit) as exit_:
    cli.run(main)
  assert exit_.value.code == 2
  assert capsys.readouterr().err == "error: --x is wrong; use --y\n"
  with pytest.raises(SystemExit) as exit_:
    cli.run(lambda: 3)
  assert exit_.value.code == 3


def test_every_command_parser_is_the_project_parser():
  # Every command's numbers are checked at the door by the same types:
  # no command builds a bare argparse parser.
  from tests.test_layout import ROOT, _commands
  for name, path in _commands().items():
    text = path.read_text()
    assert "ArgumentParser(" not in text, name
    assert "type=int" not in text and "type=float" not in text, name
  options = (ROOT / "longlora_jax" / "training" / "options.py").read_text()
  assert "type=int" not in options and "type=float" not in options
