"""Builds and removes the lab's network: namespaces, veths, bridges, addresses, routes.

Every link is created inside a lab namespace (never in the host's), so deleting
the namespaces removes every veth and bridge with them.
"""

from __future__ import annotations

import logging
import subprocess

from meshagent.lab.paths import NETNS_PREFIX
from meshagent.lab.topology import (
    POD_PREFIX6,
    UNDERLAY_BRIDGE_IP,
    UNDERLAY_BRIDGE_IP6,
    UNDERLAY_NETNS,
    UNDERLAY_PREFIX,
    UNDERLAY_PREFIX6,
    LabPlan,
    NodePlan,
    PodPlan,
)
from pyroute2 import NetNS, netns

log = logging.getLogger(__name__)

UNDERLAY_BRIDGE = "ul0"
NODE_BRIDGE = "cni0"
NODE_UPLINK = "eth0"
POD_IFACE = "eth0"
# IPv6 addresses are added without duplicate address detection (IFA_F_NODAD): the lab
# hands them out uniquely, and DAD would keep each one unusable ("tentative") for ~1 s.
IFA_F_NODAD = 0x02


def _addr6(ns: NetNS, index: int, address: str, prefixlen: int) -> None:
    ns.addr("add", index=index, address=address, prefixlen=prefixlen, flags=IFA_F_NODAD)


def _up(ns: NetNS, ifname: str) -> int:
    index = ns.link_lookup(ifname=ifname)[0]
    ns.link("set", index=index, state="up")
    return index


def _sysctl(netns_name: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    subprocess.run(
        ["ip", "netns", "exec", netns_name, "sh", "-c", f"echo {value} > {path}"], check=True
    )


def bridge_mac(index: int) -> str:
    """A fixed, locally administered MAC for a lab bridge (0: the underlay, N: node-N's).

    A Linux bridge without one takes the lowest MAC of its ports, so adding or deleting a pod
    whose veth sorts lowest changes the gateway's MAC under every other pod, whose neighbour
    entries then point at nobody until they expire: their new connections time out for tens
    of seconds (the CNI bridge plugins pin the bridge's address for the same reason). An
    address given at creation is kept (addr_assign_type "set")."""
    return f"02:6d:6c:00:{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}"


def create_underlay() -> None:
    netns.create(UNDERLAY_NETNS)
    with NetNS(UNDERLAY_NETNS) as ns:
        _up(ns, "lo")
        ns.link("add", ifname=UNDERLAY_BRIDGE, kind="bridge", address=bridge_mac(0))
        index = _up(ns, UNDERLAY_BRIDGE)
        ns.addr("add", index=index, address=UNDERLAY_BRIDGE_IP, prefixlen=UNDERLAY_PREFIX)
        _addr6(ns, index, UNDERLAY_BRIDGE_IP6, UNDERLAY_PREFIX6)


def create_node(node: NodePlan, plan: LabPlan) -> None:
    netns.create(node.netns)
    with NetNS(UNDERLAY_NETNS) as ul:
        ul.link(
            "add",
            ifname=node.underlay_veth,
            kind="veth",
            peer={"ifname": NODE_UPLINK, "net_ns_fd": node.netns},
        )
        bridge = ul.link_lookup(ifname=UNDERLAY_BRIDGE)[0]
        index = ul.link_lookup(ifname=node.underlay_veth)[0]
        ul.link("set", index=index, master=bridge, state="up")
    with NetNS(node.netns) as ns:
        _up(ns, "lo")
        uplink = _up(ns, NODE_UPLINK)
        ns.addr("add", index=uplink, address=node.underlay_ip, prefixlen=UNDERLAY_PREFIX)
        _addr6(ns, uplink, node.underlay_ip6, UNDERLAY_PREFIX6)
        ns.link("add", ifname=NODE_BRIDGE, kind="bridge", address=bridge_mac(node.index))
        bridge = _up(ns, NODE_BRIDGE)
        ns.addr("add", index=bridge, address=node.gateway, prefixlen=24)
        _addr6(ns, bridge, node.gateway6, POD_PREFIX6)
        for other in plan.nodes:
            if other.name != node.name:
                ns.route("add", dst=other.pod_cidr, gateway=other.underlay_ip)
                ns.route("add", dst=other.pod_cidr6, gateway=other.underlay_ip6)
    _sysctl(node.netns, "net.ipv4.ip_forward", "1")
    _sysctl(node.netns, "net.ipv6.conf.all.forwarding", "1")


def create_pod(pod: PodPlan, node: NodePlan) -> None:
    netns.create(pod.netns)
    with NetNS(node.netns) as ns:
        ns.link(
            "add",
            ifname=pod.host_veth,
            kind="veth",
            peer={"ifname": POD_IFACE, "net_ns_fd": pod.netns},
        )
        bridge = ns.link_lookup(ifname=NODE_BRIDGE)[0]
        index = ns.link_lookup(ifname=pod.host_veth)[0]
        ns.link("set", index=index, master=bridge, state="up")
    with NetNS(pod.netns) as ns:
        _up(ns, "lo")
        index = _up(ns, POD_IFACE)
        ns.addr("add", index=index, address=pod.ip, prefixlen=24)
        _addr6(ns, index, pod.ip6, POD_PREFIX6)
        ns.route("add", dst="0.0.0.0/0", gateway=node.gateway)
        ns.route("add", dst="::/0", gateway=node.gateway6)


def delete_pod(pod: PodPlan) -> None:
    if pod.netns in netns.listnetns():
        netns.remove(pod.netns)


def lab_namespaces() -> list[str]:
    return sorted(n for n in netns.listnetns() if n.startswith(NETNS_PREFIX))


def delete_all() -> list[str]:
    """Remove every lab namespace (and so every veth and bridge in them)."""
    removed = []
    for name in lab_namespaces():
        try:
            netns.remove(name)
            removed.append(name)
        except OSError as exc:
            log.warning("could not remove netns %s: %s", name, exc)
    return removed
