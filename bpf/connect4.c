/* SPDX-License-Identifier: Apache-2.0 */
/*
 * connect4.c - cgroup/connect4: steer TCP connects of meshed pods to the node
 * proxy. The pod is recognised by its network namespace cookie, so the
 * program can sit on a whole node's cgroup subtree and leave every other
 * process alone. The original destination is remembered under the socket
 * cookie until sockops (sockops.c) sees the handshake complete.
 */
#include <uapi/linux/in.h>

#define MESH_LOOPBACK_NET 127 /* first octet of 127.0.0.0/8 */

int mesh_connect4(struct bpf_sock_addr *ctx)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct mesh_endpoint orig = {};
	__u64 cookie;
	__u16 port;

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	if (!mesh_netns.lookup(&netns))
		return 1;

	port = bpf_ntohs(ctx->user_port);
	/* The pod talking to itself, or to the proxy directly: nothing to steer. */
	if ((bpf_ntohl(ctx->user_ip4) >> 24) == MESH_LOOPBACK_NET)
		return 1;
	if (ctx->user_ip4 == bpf_htonl(MESH_PROXY_IP4))
		return 1;
	if (excluded_ports.lookup(&port)) {
		mesh_count(MESH_CTR_EXCLUDED);
		return 1;
	}

	orig.ip4 = ctx->user_ip4;
	orig.port = port;
	cookie = bpf_get_socket_cookie(ctx);
	inflight.update(&cookie, &orig);

	ctx->user_ip4 = bpf_htonl(MESH_PROXY_IP4);
	ctx->user_port = bpf_htons(MESH_PROXY_PORT);
	mesh_count(MESH_CTR_REDIRECTED);
	return 1; /* allow the (rewritten) connect */
}
