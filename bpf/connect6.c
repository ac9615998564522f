/* SPDX-License-Identifier: Apache-2.0 */
/*
 * connect6.c - cgroup/connect6: the same steering for IPv6 sockets. Two kinds of
 * destination reach it: IPv4-mapped ones (::ffff:a.b.c.d, what gRPC and other
 * dual-stack clients dial for an IPv4 address), which go to the proxy's IPv4
 * address in mapped form so the socket keeps its family; and native IPv6 ones,
 * which go to the proxy's IPv6 listener.
 */

int mesh_connect6(struct bpf_sock_addr *ctx)
{
	struct mesh_endpoint orig = {};

	orig.addr.ip6[0] = ctx->user_ip6[0];
	orig.addr.ip6[1] = ctx->user_ip6[1];
	orig.addr.ip6[2] = ctx->user_ip6[2];
	orig.addr.ip6[3] = ctx->user_ip6[3];
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
	mesh_count(MESH_CTR_REDIRECTED_IPV6);
	if (mesh_addr_is_v4mapped(&orig.addr)) {
		ctx->user_ip6[3] = bpf_htonl(MESH_PROXY_IP4);
	} else {
		ctx->user_ip6[0] = bpf_htonl(MESH_PROXY_IP6_0);
		ctx->user_ip6[1] = bpf_htonl(MESH_PROXY_IP6_1);
		ctx->user_ip6[2] = bpf_htonl(MESH_PROXY_IP6_2);
		ctx->user_ip6[3] = bpf_htonl(MESH_PROXY_IP6_3);
	}
	ctx->user_port = bpf_htons(MESH_PROXY_PORT);
	return MESH_ALLOW;
}
