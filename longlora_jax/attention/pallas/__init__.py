"""The fused attention kernels in Pallas (GPU Triton backend).

Modules, each importing only those above it:

  blocks    which tiles a kernel visits: S²'s groups (full attention as one
            group) as index arithmetic, block ranges (plain JAX)
  flash     the kernels' bodies: online softmax, forward, dQ, dK/dV; the one
            import of Pallas Triton (`AVAILABLE`)
  grouped   causal attention in groups: S²-Attn, full attention, a context
            window (forward and backward, `jax.custom_vjp`)
  cached    a prefill chunk's attention over the stacked KV cache (forward)
"""
