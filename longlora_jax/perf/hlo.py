"""Reading XLA's compiled HLO text: the bytes its collectives move; and
its buffer assignment: the largest temporaries (`largest_temporaries`).

`compiled.as_text()` prints one instruction per line, e.g.

  %ppermute.3 = bf16[1,512,16,128]{3,2,1,0} collective-permute(%x), ...

Only result shapes are printed (operands are names), so an op's bytes are
read from its result: what a device receives from a collective-permute,
holds after an all-gather, reduces in an all-reduce or an all-to-all; a
reduce-scatter's operand is its result times the group. Asynchronous pairs
count once, at "-start" (whose tuple holds the operands, then the results,
apart from all-reduce-start's, which is the results);
ops over groups of one device (no-ops XLA keeps from shard_map) count zero.
Ops inside a loop body count once, not once per trip.
"""

import re

KINDS = ("collective-permute", "all-gather", "all-reduce", "reduce-scatter",
         "all-to-all")
_OP = re.compile(r"=\s+(.+?)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[0-9,]*\})")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
# XLA >= 0.12: replica_groups=mesh['data'=1,'context'=8] {'context'}
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_BITS = {"pred": 8, "s4": 4, "u4": 4}


def _bytes(dtype: str, dims: str) -> int:
  bits = _BITS.get(dtype) or int(re.sub(r"^[a-z]+", "", dtype)[:2]
                                 .rstrip("e") or 8)
  count = 1
  for d in filter(None, dims.split(",")):
    count *= int(d)
  return count * bits // 8


def _group_size(line: str) -> int | None:
  """Devices per replica group, None when the line names none."""
  if (m := _GROUPS_LIST.search(line)):
    return len(m.group(1).strip("{}").split(","))
  if (m := _GROUPS_IOTA.search(line)):
    return int(m.group(1).split(",")[-1])
  if (m := _GROUPS_MESH.search(line)):
    sizes = {name: int(n) for name, n in re.findall(r"'(\w+)'=(\d+)",
                                                     m.group(1))}
    size = 1
    for name in re.findall(r"'(\w+)'", m.group(2)):
      size *= sizes[name]
    return size
  return None


def _elements(tuple_text: str) -> list[str]:
  """The top-level elements of a tuple type "(a, (b, c), d)"."""
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(tuple_text):
    depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
    if (ch == "," and depth == 1) or (ch == ")" and depth == 0):
      parts.append(tuple_text[start:i].strip())
      start = i + 1
  return parts


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes per device by collective kind (all of `KINDS`, zeros included)."""
  totals = dict.fromkeys(KINDS, 0)
  for line in hlo_text.splitlines():
    if not (m := _OP.search(line)):
      continue
    result, kind, start = m.groups()
    shapes = [_bytes(*s) for s in _SHAPE.findall(result)]
    group = _group_size(line)
    if group == 1 or not shapes:
      continue
    if start and kind != "all-reduce":
      shapes = [_bytes(*s) for s in _SHAPE.findall(_elements(result)[1])]
    size = sum(shapes)
    if kind == "reduce-scatter":
      size *= group or 1
    totals[kind] += size
  return totals


_ALLOCATION = re.compile(r"^allocation \d+: size \d+, (.*)$")
_VALUE = re.compile(r"^ value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (\S+)")


def largest_temporaries(buffer_assignment: str, k: int = 3) -> list[dict]:
  """The `k` largest buffers in XLA's temporary allocation in device
  memory, from its buffer-assignment dump: [{"name", "shape", "gib"}],
  largest first. Host-memory temporaries (offloaded activations, a
  "color 5" allocation: memory space S(5)) are left out.

  Values sharing one (offset, size) are one buffer seen under several names
  (a loop's carry and the op that updates it in place); the first is kept.
  """
  buffers, in_temp = {}, False
  for line in buffer_assignment.splitlines():
    if (m := _ALLOCATION.match(line)):
      in_temp = ("preallocated-temp" in m.group(1)
                 and "color 5" not in m.group(1))
    elif in_temp and (m := _VALUE.match(line)):
      name, size, offset, shape = m.groups()
      buffers.setdefault((int(offset), int(size)), (name, shape.split("{")[0]))
  top = sorted(buffers.items(), key=lambda kv: -kv[0][1])[:k]
  return [{"name": name, "shape": shape, "gib": size / 2**30}
          for (_, size), (name, shape) in top]
