/* SPDX-License-Identifier: Apache-2.0 */
/*
 * meshagent.h - the one declaration of every struct and constant shared by the
 * eBPF programs and userspace. agent/datapath/maps.py mirrors this file with
 * ctypes; tests/unit/test_map_layout.py compiles this header with the host C
 * compiler and checks the mirror's sizes and offsets against it.
 *
 * Addresses: every address is 16 bytes, IPv6 in network byte order, an IPv4
 * address as its IPv4-mapped form (::ffff:a.b.c.d), so one key serves a
 * connection whatever family its socket has (an AF_INET6 socket that dials
 * ::ffff:a.b.c.d is seen by the proxy's IPv4 listener as a.b.c.d). Ports are
 * in host byte order.
 *
 * Plain C: no bcc macros here (they live in maps.h) so gcc can compile it.
 */
#ifndef MESHAGENT_H
#define MESHAGENT_H

#include <linux/types.h>

/* Settings arrive as -D flags from the loader; these are the defaults. */
#ifndef MESH_PROXY_IP4
#define MESH_PROXY_IP4 0x7f000001 /* host order; the node proxy's address */
#endif
/* The proxy's IPv6 address as four network-order words (host-order values of
 * each 32-bit group); all zero when the node has no IPv6 proxy address, and
 * then native IPv6 connects of meshed pods are refused, never let through. */
#ifndef MESH_PROXY_IP6_0
#define MESH_PROXY_IP6_0 0
#define MESH_PROXY_IP6_1 0
#define MESH_PROXY_IP6_2 0
#define MESH_PROXY_IP6_3 0
#endif
#ifndef MESH_PROXY_PORT
#define MESH_PROXY_PORT 15001 /* outbound capture port, as Istio's */
#endif
#ifndef MESH_MAX_PODS
#define MESH_MAX_PODS 1024 /* meshed network namespaces per node */
#endif
#ifndef MESH_MAX_INFLIGHT
#define MESH_MAX_INFLIGHT 65536 /* redirected connections not yet accepted */
#endif
#ifndef MESH_MAX_PEER_AUTH
#define MESH_MAX_PEER_AUTH 4096 /* (pod ip, port) mTLS entries per node */
#endif
#ifndef MESH_MAX_EXCLUDED_PORTS
#define MESH_MAX_EXCLUDED_PORTS 64
#endif
#ifndef MESH_MAX_JOINED
#define MESH_MAX_JOINED 65536 /* proxy sockets joined in the kernel (two per connection) */
#endif

/* Per-node counters, one slot each in the per-CPU `counters` array. */
enum mesh_counter {
	MESH_CTR_REDIRECTED = 0, /* meshed TCP connect rewritten to the proxy */
	MESH_CTR_EXCLUDED = 1, /* meshed TCP connect left alone: excluded port */
	MESH_CTR_ESTABLISHED = 2, /* original destination handed to the proxy */
	MESH_CTR_INFLIGHT_MISS = 3, /* established, but its connect record was gone */
	MESH_CTR_STRICT_DROPPED = 4, /* plaintext connection to a STRICT pod, dropped */
	MESH_CTR_REDIRECTED_IPV6 = 5, /* of REDIRECTED: made on an IPv6 socket */
	MESH_CTR_REFUSED = 6, /* meshed connect the proxy cannot carry: refused (EPERM) */
	MESH_CTR_PEER_RESTORED = 7, /* getpeername() answered with the original destination */
	MESH_CTR_FAIL_OPEN = 8, /* agent down: a fail-open pod's connect went straight through */
	MESH_CTR_FAIL_CLOSED = 9, /* agent down: a fail-closed pod's connect refused (EPERM) */
	MESH_CTR_JOIN_REDIRECTED = 10, /* sk_skb: a batch of a joined socket sent on to its partner */
	MESH_CTR_JOIN_UNPAIRED = 11, /* sk_skb: a joined socket without a partner: bytes passed up */
	MESH_CTR_MAX = 12,
};

/* Bits of mesh_pod.flags. */
enum mesh_pod_flag {
	/* While the agent is down (its heartbeat stale), the pod's connects go to
	 * their original destination instead of being refused (fail mode `open`). */
	MESH_POD_FAIL_OPEN = 1,
};

/* Default of mesh_heartbeat.timeout_ns when the agent left it 0: 1 s. */
#define MESH_HEARTBEAT_TIMEOUT_NS 1000000000ULL

/* Value of peer_auth: the mTLS mode a pod (port) accepts. Only modes that need
 * the kernel's help are stored; a missing entry means "let it through". */
enum mesh_mtls_mode {
	MESH_MTLS_PERMISSIVE = 0, /* explicit, to override a pod-wide STRICT on one port */
	MESH_MTLS_STRICT = 1,
};

/* An IPv6 address, or an IPv4 one in its mapped form; network order. */
struct mesh_addr {
	__u32 ip6[4];
};

/* Value of mesh_netns: what the datapath knows of one meshed pod namespace.
 * `addr` is the pod's primary IP: the key of its peer_auth entries, whichever
 * of its addresses (IPv4, IPv6, link-local) a packet is sent to. */
struct mesh_pod {
	struct mesh_addr addr;
	__u32 flags; /* enum mesh_pod_flag bits */
};

/* The one value of the `heartbeat` array: the agent that owns the node's maps
 * writes `beat_ns` (CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns) every
 * ~250 ms. When it is older than `timeout_ns` (or was never written), the agent
 * counts as down and the connect programs apply each pod's fail mode instead of
 * redirecting to a proxy that is not there. Only the agent writes it: no
 * program does, and the pin is root's alone. */
struct mesh_heartbeat {
	__u64 beat_ns;
	__u64 timeout_ns; /* 0: MESH_HEARTBEAT_TIMEOUT_NS */
};

/* A TCP endpoint: the original destination of a redirected connection, or
 * the client side of it as the proxy sees it after accept(). */
struct mesh_endpoint {
	struct mesh_addr addr;
	__u16 port; /* host order */
	__u16 pad;
};

/* Value of join_peer, keyed by the socket cookie of one of the node proxy's two sockets of
 * a same-node connection joined in the kernel (join.c): the other socket's cookie, and the
 * bytes that arrived on this one and were sent on to the other (added by join.c; the proxy
 * reads them when the connection ends). */
struct mesh_join {
	__u64 partner;
	__u64 bytes;
};

#endif /* MESHAGENT_H */
