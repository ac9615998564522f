"""Where the lab keeps things on the host. Every name starts with the lab's name
(`meshlab`, or `meshlab_<instance>` with MESHLAB_INSTANCE set, so several labs can
run side by side), so `meshlab down` can find and remove all of it, even with no
state file left, without touching another instance's."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

INSTANCE_PATTERN = r"[a-z0-9]{1,8}"  # it goes into interface and netns names
INSTANCE = os.environ.get("MESHLAB_INSTANCE", "")
if INSTANCE and not re.fullmatch(INSTANCE_PATTERN, INSTANCE):
    raise SystemExit("MESHLAB_INSTANCE must be 1-8 lowercase letters or digits")
LAB_NAME = f"meshlab_{INSTANCE}" if INSTANCE else "meshlab"

# Pod IPs must be unique on the machine (agents find pods by IP, as on a real node), so
# each instance gets its own pod network 10.<octet>.0.0/16; the default lab's is 10.244.
POD_NET_OCTET = (
    100 + int(hashlib.sha1(INSTANCE.encode()).hexdigest(), 16) % 100 if INSTANCE else 244
)

RUN_DIR = Path("/run") / LAB_NAME
STATE_FILE = RUN_DIR / "state.json"
CLUSTER_DIR = RUN_DIR / "cluster"  # the controller's manifest folder
LOG_DIR = RUN_DIR / "logs"
KUBE_DIR = RUN_DIR / "kube"  # the control plane's workdir (lab/kubecontrol.py): pki, etcd, ...
NETNS_PREFIX = LAB_NAME + "-"
NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")  # per-namespace /etc files that `ip netns exec` binds
BPFFS = Path("/sys/fs/bpf")
BPFFS_DIR = BPFFS / LAB_NAME
CGROUP_NAME = LAB_NAME


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
