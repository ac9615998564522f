/* SPDX-License-Identifier: Apache-2.0 */
/*
 * getpeername.c - cgroup/getpeername4 and getpeername6: a redirected socket's
 * peer is the node proxy, but the application asked for its original
 * destination, and that is what getpeername() answers (as Istio's sidecars and
 * ztunnel show it, and Cilium restores it). Only a socket whose current peer
 * is still the proxy is rewritten.
 */

int mesh_peername4(struct bpf_sock_addr *ctx)
{
	struct mesh_endpoint *orig;

	if (ctx->user_ip4 != bpf_htonl(MESH_PROXY_IP4) ||
	    ctx->user_port != bpf_htons(MESH_PROXY_PORT))
		return MESH_ALLOW;
	orig = sock_orig.sk_storage_get(ctx->sk, 0, 0);
	if (!orig || !mesh_addr_is_v4mapped(&orig->addr))
		return MESH_ALLOW;
	ctx->user_ip4 = orig->addr.ip6[3];
	ctx->user_port = bpf_htons(orig->port);
	mesh_count(MESH_CTR_PEER_RESTORED);
	return MESH_ALLOW;
}

int mesh_peername6(struct bpf_sock_addr *ctx)
{
	struct mesh_endpoint *orig;
	struct mesh_addr peer = {};

	if (ctx->user_port != bpf_htons(MESH_PROXY_PORT))
		return MESH_ALLOW;
	peer.ip6[0] = ctx->user_ip6[0];
	peer.ip6[1] = ctx->user_ip6[1];
	peer.ip6[2] = ctx->user_ip6[2];
	peer.ip6[3] = ctx->user_ip6[3];
	if (mesh_addr_is_v4mapped(&peer) ? peer.ip6[3] != bpf_htonl(MESH_PROXY_IP4)
					 : !mesh_addr_is_proxy6(&peer))
		return MESH_ALLOW;
	orig = sock_orig.sk_storage_get(ctx->sk, 0, 0);
	if (!orig)
		return MESH_ALLOW;
	ctx->user_ip6[0] = orig->addr.ip6[0];
	ctx->user_ip6[1] = orig->addr.ip6[1];
	ctx->user_ip6[2] = orig->addr.ip6[2];
	ctx->user_ip6[3] = orig->addr.ip6[3];
	ctx->user_port = bpf_htons(orig->port);
	mesh_count(MESH_CTR_PEER_RESTORED);
	return MESH_ALLOW;
}
