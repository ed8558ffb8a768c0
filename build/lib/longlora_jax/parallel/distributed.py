"""Multi-process (multi-host) set-up and feeding each process its batch slice.

Launch one process per host (each sees its local GPUs):
- SLURM / Open MPI: `srun python -m train.extend ...`; JAX detects the rest.
- Anywhere else: set LONGLORA_COORDINATOR=host0:port, LONGLORA_NUM_PROCESSES
  and LONGLORA_PROCESS_ID on every host.
"""

import os

import jax
import numpy as np

ENV_COORDINATOR = "LONGLORA_COORDINATOR"
ENV_NUM_PROCESSES = "LONGLORA_NUM_PROCESSES"
ENV_PROCESS_ID = "LONGLORA_PROCESS_ID"


def initialize_from_env() -> bool:
  """`jax.distributed.initialize` when this is a multi-process launch.

  Must run before anything touches a JAX device. Returns whether it ran.
  """
  # CPU devices of different processes talk through gloo (no effect on GPUs).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if os.environ.get(ENV_COORDINATOR):
    jax.distributed.initialize(
        coordinator_address=os.environ[ENV_COORDINATOR],
        num_processes=int(os.environ[ENV_NUM_PROCESSES]),
        process_id=int(os.environ[ENV_PROCESS_ID]))
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(
      os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
    return True
  return False


def process_slice(global_batch: int) -> slice:
  """The rows of a global batch that this process feeds."""
  per_process = global_batch // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def global_batch(local, shardings, global_rows: int):
  """Global arrays from each process's rows (batch axis 1 of [accum, batch, ...])."""
  def make(x, sharding):
    shape = (x.shape[0], global_rows, *x.shape[2:])
    return jax.make_array_from_process_local_data(sharding, np.asarray(x), shape)
  return jax.tree.map(make, local, shardings)
