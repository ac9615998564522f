"""Where the lab keeps things on the host. Every name starts with `meshlab`, so
`meshlab down` can find and remove all of it, even with no state file left."""

from __future__ import annotations

from pathlib import Path

RUN_DIR = Path("/run/meshlab")
STATE_FILE = RUN_DIR / "state.json"
CLUSTER_DIR = RUN_DIR / "cluster"  # the controller's manifest folder
LOG_DIR = RUN_DIR / "logs"
NETNS_PREFIX = "meshlab-"
NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")  # per-namespace /etc files that `ip netns exec` binds
BPFFS = Path("/sys/fs/bpf")
BPFFS_DIR = BPFFS / "meshlab"
CGROUP_NAME = "meshlab"


def cgroup2_root() -> Path:
    """The cgroup-v2 mount (/sys/fs/cgroup on unified hosts, .../unified on hybrid ones)."""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    raise RuntimeError("no cgroup2 mount in /proc/mounts; the lab needs cgroup v2")


def lab_cgroup() -> Path:
    return cgroup2_root() / CGROUP_NAME
