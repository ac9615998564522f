/* SPDX-License-Identifier: Apache-2.0 */
/*
 * connect4.c - cgroup/connect4: steer TCP connects of meshed pods on IPv4
 * sockets to the node proxy. The pod is recognised by its network namespace
 * cookie, so the program can sit on a whole node's cgroup subtree and leave
 * every other process alone. The decision is redirect.c's.
 */

int mesh_connect4(struct bpf_sock_addr *ctx)
{
	struct mesh_endpoint orig = {};

	mesh_addr_from_ip4(&orig.addr, ctx->user_ip4);
	orig.port = bpf_ntohs(ctx->user_port);
	switch (mesh_decide(ctx, &orig)) {
	case MESH_PASS:
		return MESH_ALLOW;
	case MESH_DENY:
		return MESH_REFUSE;
	case MESH_REDIRECT:
		break;
	}
	mesh_remember(ctx, &orig);
	ctx->user_ip4 = bpf_htonl(MESH_PROXY_IP4);
	ctx->user_port = bpf_htons(MESH_PROXY_PORT);
	return MESH_ALLOW;
}
