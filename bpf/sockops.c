/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sockops.c - when a redirected connect completes, re-key its original
 * destination by the client's (ip, port): the one thing the proxy knows about
 * a connection after accept(). Runs before the final ACK leaves, so the entry
 * is there before the proxy can accept.
 */

int mesh_sockops(struct bpf_sock_ops *skops)
{
	struct mesh_endpoint client = {};
	struct mesh_endpoint *orig;
	__u64 cookie;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	if (skops->family != 2 /* AF_INET */)
		return 1;

	cookie = bpf_get_socket_cookie(skops);
	orig = inflight.lookup(&cookie);
	if (!orig)
		return 1; /* not a redirected connection */

	client.ip4 = skops->local_ip4; /* network order */
	client.port = skops->local_port; /* host order */
	if (orig_dst.update(&client, orig) == 0)
		mesh_count(MESH_CTR_ESTABLISHED);
	inflight.delete(&cookie);
	return 1;
}
