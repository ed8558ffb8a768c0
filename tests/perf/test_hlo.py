from longlora_jax.perf import hlo
from longlora_jax.perf.hlo import collective_bytes

# Written by hand in the shape of XLA's compiled text (CPU and GPU forms).
HLO = """
HloModule jit_step, entry_computation_layout={()->()}

%body {
  %ppermute.3 = bf16[1,512,16,128]{3,2,1,0} collective-permute(%x), channel_id=1, source_target_pairs={{1,0},{2,1}}
  %ag = f32[8,64]{1,0} all-gather(%w), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %ar.1 = (f32[1,512,4,64]{3,2,1,0}, s32[2]{0}) all-reduce(%a, %b), channel_id=3, replica_groups={{0},{1},{2},{3}}, to_apply=%add
  %ar.2 = (f32[16]{0}, s32[2]{0}) all-reduce(%a, %b), channel_id=4, replica_groups=[2,4]<=[8], to_apply=%add
  %rs = bf16[4,32]{1,0} reduce-scatter(%g), channel_id=5, replica_groups=[1,8]<=[8], dimensions={0}
  %cps = (bf16[2,1024]{1,0}, bf16[2,1024]{1,0}, u32[], u32[]) collective-permute-start(%y), channel_id=6, source_target_pairs={{0,1}}
  %cpd = bf16[2,1024]{1,0} collective-permute-done(%cps)
  %ags = (bf16[1,8]{1,0}, bf16[8,8]{1,0}) all-gather-start(%z), channel_id=7, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = bf16[8,8]{1,0} all-gather-done(%ags)
  %rss = ((bf16[1,64]{1,0}, bf16[1,64]{1,0}), (bf16[1,8]{1,0}, bf16[1,8]{1,0})) reduce-scatter-start(%p, %q), channel_id=9, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={1}
  %rsd = (bf16[1,8]{1,0}, bf16[1,8]{1,0}) reduce-scatter-done(%rss)
  %ars = f32[32]{0} all-reduce-start(%r), channel_id=10, replica_groups={{0,1}}, to_apply=%add
  %ard = f32[32]{0} all-reduce-done(%ars)
  %a2a = f8e4m3fn[4,4]{1,0} all-to-all(%u), channel_id=8, replica_groups={{0,1,2,3}}, dimensions={0}
  %ar.3 = (f32[1,128,2,16]{3,2,1,0}, f32[1,128,2,16]{3,2,1,0}) all-reduce(%c, %d), channel_id=11, replica_groups=mesh['data'=1,'context'=8,'tensor'=1] {'tensor'}, use_global_device_ids=true, to_apply=%add
  %ar.4 = f32[8]{0} all-reduce(%e), channel_id=12, replica_groups=mesh['data'=2,'context'=4,'tensor'=1] {'data','context'}, use_global_device_ids=true, to_apply=%add
  %not_a_collective = f32[9]{0} add(%all-gather.1, %all-gather.2)
}
"""


def test_collective_bytes_from_hand_written_hlo():
  got = collective_bytes(HLO)
  assert got == {
      # 1*512*16*128 bf16, then the -start's result (2*1024 bf16); -done
      # lines do not count again.
      "collective-permute": 1 * 512 * 16 * 128 * 2 + 2 * 1024 * 2,
      "all-gather": 8 * 64 * 4 + 8 * 8 * 2,
      # Groups of one device move nothing (also when named by mesh axes
      # of size 1); a tuple counts every element.
      "all-reduce": 16 * 4 + 2 * 4 + 32 * 4 + 8 * 4,
      # A reduce-scatter's operand: its result times the group of 8; an
      # asynchronous one holds ((operands), (results)).
      "reduce-scatter": 4 * 32 * 2 * 8 + 2 * 8 * 2 * 8,
      "all-to-all": 16,
  }


BUFFER_ASSIGNMENT = """BufferAssignment:
allocation 0: size 4096, parameter 0, shape |f32[1024]| at ShapeIndex {}:
 value: <3 p.1 @0> (size=4096,offset=0): f32[1024]{0}
allocation 1: size 9000, preallocated-temp:
 value: <7 fusion.2 @0> (size=6000,offset=0): bf16[3000]{0}
 value: <8 while.1{1} (phi) @0> (size=6000,offset=0): bf16[3000]{0}
 value: <9 fusion.5 @0> (size=2000,offset=6000): f32[500]{0}
 value: <10 add.3 @0> (size=1000,offset=8000): s8[1000]{0}
allocation 2: size 8, constant:
 value: <11 constant.1 @0> (size=8,offset=0): s64[]
allocation 3: size 50000, color 5, preallocated-temp:
 value: <12 dynamic-update-slice @5> (size=50000,offset=0): bf16[25000]{0:S(5)}
"""


def test_largest_temporaries_reads_xla_buffer_assignment():
  # The parameter (4096 B) and the constant are not temporaries, nor is the
  # buffer in host memory (color 5: offloaded activations); the while
  # carry aliases fusion.2 (same offset and size) and is the same buffer.
  top = hlo.largest_temporaries(BUFFER_ASSIGNMENT, k=2)
  assert [(t["name"], t["shape"], t["gib"] * 2**30) for t in top] == [
      ("fusion.2", "bf16[3000]", 6000), ("fusion.5", "f32[500]", 2000)]
