/* SPDX-License-Identifier: Apache-2.0 */
/*
 * join.c - same-node connections joined in the kernel. The node proxy puts both of its
 * sockets of an authorized same-node L4 connection (the one it accepted from the client pod
 * and the one it dialled to the server pod) into `sock_join`, after writing each one's
 * partner into `join_peer`. This stream-verdict program (attached to `sock_join`, no stream
 * parser: each batch as it arrives) then sends every batch that arrives on one socket out of
 * its partner (egress), counted per socket, so the payload never reaches user space.
 *
 * A socket in the hash without a partner entry (being joined or parted) passes its bytes
 * up (SK_PASS): the proxy can still read them; nothing is dropped here. EOF and resets are
 * not carried by the redirect: the proxy watches both sockets for them (agent/proxy/kjoin.py).
 */

int mesh_join_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct mesh_join *join = join_peer.lookup(&cookie);
	__u64 partner;
	__u32 len = skb->len;

	/* A bare FIN reaches the verdict as an empty batch: it carries no byte, and sent on it
	 * would break the partner (an empty send is an error there). The FIN itself is already
	 * in the socket's state, where the proxy sees it. */
	if (!len)
		return SK_DROP;
	if (!join) {
		mesh_count(MESH_CTR_JOIN_UNPAIRED);
		return SK_PASS;
	}
	partner = join->partner;
	if (sock_join.sk_redirect_hash(skb, &partner, 0) != SK_PASS) {
		mesh_count(MESH_CTR_JOIN_UNPAIRED);
		return SK_PASS; /* partner gone (closing): let the proxy see the bytes */
	}
	__sync_fetch_and_add(&join->bytes, len);
	mesh_count(MESH_CTR_JOIN_REDIRECTED);
	return SK_PASS;
}
