"""The training engine: the recipe (`TrainConfig`, `RunSpec`), the sharded
train step, the loop, checkpoints and the export of a run.

  recipe    TrainConfig, RunSpec, run.json, context and group checks
  step      the train step, its shardings, its state, `lower_step`
  saving    Orbax checkpoints of the trainable state
  loop      steps, metrics, progress, interrupts, the NaN stop
  export    the merged model and the PEFT adapter of a run
  options   the training commands' options and parser
  run       a whole run, as the commands start it
"""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
    "TrainConfig": "recipe",
    "RunSpec": "recipe",
    "TrainState": "step",
    "init_state": "step",
    "initial_state": "step",
    "jit_train_step": "step",
    "lower_step": "step",
    "params_of": "step",
    "train_step": "step",
}, submodules=("recipe", "step", "saving", "loop", "export", "options",
               "run"))
