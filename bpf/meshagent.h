/* SPDX-License-Identifier: Apache-2.0 */
/*
 * meshagent.h - the one declaration of every struct and constant shared by the
 * eBPF programs and userspace. agent/datapath/maps.py mirrors this file with
 * ctypes; tests/unit/test_map_layout.py compiles this header with the host C
 * compiler and checks the mirror's sizes and offsets against it.
 *
 * Byte orders: IPv4 addresses are kept in network byte order (as the kernel
 * hands them to sock_addr and sock_ops programs); ports in host byte order.
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

/* Per-node counters, one slot each in the per-CPU `counters` array. */
enum mesh_counter {
	MESH_CTR_REDIRECTED = 0, /* meshed TCP connect rewritten to the proxy */
	MESH_CTR_EXCLUDED = 1, /* meshed TCP connect left alone: excluded port */
	MESH_CTR_ESTABLISHED = 2, /* original destination handed to the proxy */
	MESH_CTR_INFLIGHT_MISS = 3, /* established, but its connect record was gone */
	MESH_CTR_STRICT_DROPPED = 4, /* plaintext connection to a STRICT pod, dropped */
	MESH_CTR_MAX = 5,
};

/* Value of peer_auth: the mTLS mode a pod (port) accepts. Only modes that need
 * the kernel's help are stored; a missing entry means "let it through". */
enum mesh_mtls_mode {
	MESH_MTLS_PERMISSIVE = 0, /* explicit, to override a pod-wide STRICT on one port */
	MESH_MTLS_STRICT = 1,
};

/* Value of mesh_netns: what the datapath knows of one meshed pod namespace. */
struct mesh_pod {
	__u32 ip4; /* the pod's IPv4 address, network order */
	__u32 flags; /* MESH_POD_* */
};

/* A TCP endpoint: the original destination of a redirected connection, or
 * the client side of it as the proxy sees it after accept(). */
struct mesh_endpoint {
	__u32 ip4; /* network order */
	__u16 port; /* host order */
	__u16 pad;
};

#endif /* MESHAGENT_H */
