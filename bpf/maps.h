/* SPDX-License-Identifier: Apache-2.0 */
/*
 * maps.h - every BPF map of the datapath, declared once. The loader compiles
 * all hook files in one unit that includes this header first, so each map
 * exists once and the programs share it; userspace opens the maps by their
 * pins (agent/datapath/maps.py names them).
 */
#ifndef MESHAGENT_MAPS_H
#define MESHAGENT_MAPS_H

#include "meshagent.h"

/* netns cookie -> meshed pod. Filled by the agent's pod discovery. */
BPF_HASH(mesh_netns, __u64, struct mesh_pod, MESH_MAX_PODS);

/* socket cookie -> original destination, from connect() until the handshake
 * completes. LRU: a connect that never completes must not leak a slot. */
BPF_TABLE("lru_hash", __u64, struct mesh_endpoint, inflight, MESH_MAX_INFLIGHT);

/* client (ip, port) -> original destination; the proxy reads and deletes it
 * after accept(). LRU for the same reason. */
BPF_TABLE("lru_hash", struct mesh_endpoint, struct mesh_endpoint, orig_dst,
	  MESH_MAX_INFLIGHT);

/* destination port (host order) -> 1: connects to these are never redirected. */
BPF_HASH(excluded_ports, __u16, __u8, MESH_MAX_EXCLUDED_PORTS);

/* (pod's primary ip, port) -> enum mesh_mtls_mode; port 0 is the pod-wide mode. */
BPF_HASH(peer_auth, struct mesh_endpoint, __u8, MESH_MAX_PEER_AUTH);

/* source address -> 1: the node's own addresses (its proxy, kubelet probes), which
 * may always open connections to pods, STRICT or not. */
BPF_HASH(trusted_sources, struct mesh_addr, __u8, 16);

/* socket -> original destination, for as long as the socket lives: getpeername()
 * answers with it (getpeername.c). Socket-local storage, freed with the socket,
 * so it needs no pin and cannot leak. */
BPF_SK_STORAGE(sock_orig, struct mesh_endpoint);

/* [0] -> the agent's heartbeat (meshagent.h); read by redirect.c only. */
BPF_ARRAY(heartbeat, struct mesh_heartbeat, 1);

/* Same-node connections joined in the kernel (join.c): the node proxy's two sockets of each,
 * keyed by socket cookie. The proxy inserts them (fd as value) once it authorized the
 * connection; a socket leaves the hash when it closes. The sk_skb verdict program is
 * attached to this map. Never carried over to a new build (sockets, not data). */
BPF_SOCKHASH(sock_join, __u64, MESH_MAX_JOINED);

/* socket cookie -> its partner and byte count (struct mesh_join); written by the proxy
 * before it inserts the sockets, removed by it when the connection ends. */
BPF_HASH(join_peer, __u64, struct mesh_join, MESH_MAX_JOINED);

BPF_PERCPU_ARRAY(counters, __u64, MESH_CTR_MAX);

#endif /* MESHAGENT_MAPS_H */
