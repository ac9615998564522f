"""The agent's cost of one delta: from a delta received to the next data-plane view in force.

Builds `push_latency`'s cluster (--nodes x --pods-per-node pods, 10 Services) in a controller
model, compiles it as the push server does (controller/incremental.py), gives one node's
`SnapshotStore` the whole snapshot, then --rounds times changes one pod's label (as
`push_latency` does: a pod behind a Service, so its workload and its Service change), takes
the delta the push server would send (common/snapshotdelta.py `diff`). Then, with the
controller's side gone, one `SnapshotStore` applies the whole snapshot and each delta as the
agent's config client does (validation, content version check, tables, saved to disk) and
the CPU time of each is reported (a proxy worker applies the same delta with the same code,
without saving). No network, no lab.

  python -m benchmarks.view_apply                       # 1,000 nodes x 30 pods, 20 rounds
  python -m benchmarks.view_apply --nodes 100 --pods-per-node 10 --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

from meshagent.agent.state import SnapshotStore
from meshagent.common import snapshotdelta
from meshagent.controller.incremental import IncrementalCompiler
from meshagent.controller.model import ClusterModel

from benchmarks.push_latency import cluster, node_name, pod

FIELDS = (*snapshotdelta.SHARED_FIELDS, "local_workloads")


def deltas(nodes: int, pods_per_node: int, rounds: int) -> tuple[str, str, list[tuple]]:
    """The node's first snapshot (JSON) and the deltas of ``rounds`` pod changes, each as it
    arrives: (base, version, changes as JSON)."""
    model = ClusterModel()
    for kind, objects in cluster(nodes, pods_per_node).items():
        model.replace(kind, objects)
    compiler = IncrementalCompiler()
    node = node_name(0)
    held = compiler.compile(model).for_node(node)
    first = held.model_dump_json()
    out = []
    for r in range(1, rounds + 1):
        changed = (r * 7919) % (nodes * pods_per_node)
        model.upsert("Pod", pod(changed // pods_per_node, changed % pods_per_node, r))
        new = compiler.compile(model).for_node(node)
        changes = json.dumps(snapshotdelta.diff(held, new, FIELDS))
        out.append((held.version, new.version, changes))
        held = new
    return node, first, out


def measure(nodes: int, pods_per_node: int, rounds: int) -> dict:
    node, first, changes = deltas(nodes, pods_per_node, rounds)
    gc.collect()  # the controller's side is gone: the agent's heap is what its GC walks
    with tempfile.TemporaryDirectory() as folder:
        store = SnapshotStore(node, Path(folder))
        started = time.process_time()
        store.apply(json.loads(first))
        first_s = time.process_time() - started
        samples = []
        for base, version, delta in changes:
            started = time.process_time()
            store.apply_delta(base, version, json.loads(delta))
            samples.append(time.process_time() - started)
    return {
        "nodes": nodes,
        "pods": nodes * pods_per_node,
        "rounds": rounds,
        "first_snapshot_s": round(first_s, 3),
        "delta_s": _figures(samples),
    }


def _figures(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 4),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
        "max": round(ordered[-1], 4),
        "mean": round(statistics.fmean(ordered), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods-per-node", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.nodes, args.pods_per_node, args.rounds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
