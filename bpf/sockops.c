/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sockops.c - when a redirected connect completes, re-key its original
 * destination by the client's (ip, port): the one thing the proxy knows about
 * a connection after accept(). Runs before the final ACK leaves, so the entry
 * is there before the proxy can accept. The client address is kept in the
 * 16-byte form (redirect.c): an IPv6 socket that dialled an IPv4-mapped
 * address already has a mapped local address, which is what the proxy's IPv4
 * listener sees as plain IPv4.
 */
#define MESH_AF_INET 2
#define MESH_AF_INET6 10

int mesh_sockops(struct bpf_sock_ops *skops)
{
	struct mesh_endpoint client = {};
	struct mesh_endpoint *orig;
	__u64 cookie;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	if (skops->family == MESH_AF_INET) {
		mesh_addr_from_ip4(&client.addr, skops->local_ip4);
	} else if (skops->family == MESH_AF_INET6) {
		client.addr.ip6[0] = skops->local_ip6[0];
		client.addr.ip6[1] = skops->local_ip6[1];
		client.addr.ip6[2] = skops->local_ip6[2];
		client.addr.ip6[3] = skops->local_ip6[3];
	} else {
		return 1;
	}

	cookie = bpf_get_socket_cookie(skops);
	orig = inflight.lookup(&cookie);
	if (!orig)
		return 1; /* not a redirected connection */

	client.port = skops->local_port; /* host order */
	if (orig_dst.update(&client, orig) == 0)
		mesh_count(MESH_CTR_ESTABLISHED);
	inflight.delete(&cookie);
	return 1;
}
