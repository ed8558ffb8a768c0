"""The training engine: the tasks (`EXTEND`, `SFT`), the recipe
(`TrainConfig`, `RunSpec`), the sharded train step, the loop, checkpoints
and the export of a run.

  tasks     what differs between context extension and fine-tuning
  recipe    TrainConfig, RunSpec, run.json, context and group checks
  step      the train step, its shardings, its state, `lower_step`
  saving    Orbax checkpoints of the trainable state
  loop      steps, metrics, progress, interrupts, the NaN stop
  export    the merged model and the PEFT adapter of a run
  options   the training commands' options and parser, a checkpoint's
            defaults
  run       a whole run, as the commands start it, and its Outcome
"""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
    "EXTEND": "tasks",
    "SFT": "tasks",
    "Task": "tasks",
    "TrainConfig": "recipe",
    "RunSpec": "recipe",
    "TrainState": "step",
    "init_state": "step",
    "initial_state": "step",
    "jit_train_step": "step",
    "lower_step": "step",
    "params_of": "step",
    "train_step": "step",
}, submodules=("tasks", "recipe", "step", "saving", "loop", "export",
               "options", "run"))
