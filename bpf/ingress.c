/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ingress.c - cgroup_skb/ingress: STRICT peer authentication in the kernel.
 * A new TCP connection (SYN) to a pod whose mode is STRICT is dropped unless
 * it comes from the node itself (its proxy delivering tunnelled traffic, or
 * kubelet probes) or from the pod to itself. Everything else passes: existing
 * connections, other protocols (ICMP, ICMPv6 and so neighbour discovery, UDP),
 * PERMISSIVE and DISABLE pods.
 *
 * IPv4 and IPv6 alike, and whichever of its addresses a packet is sent to (a
 * global one or an IPv6 link-local one): the pod is found by its network
 * namespace cookie, and its mode is looked up under its primary IP.
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>

#define MESH_PASS_PKT 1
#define MESH_DROP_PKT 0
/* IPv6 extension headers walked before the TCP header; a SYN behind more of them
 * than this is dropped for a STRICT pod rather than left unjudged. */
#define MESH_MAX_EXT_HEADERS 6
#define MESH_NEXTHDR_HOP 0
#define MESH_NEXTHDR_ROUTING 43
#define MESH_NEXTHDR_FRAGMENT 44
#define MESH_NEXTHDR_AUTH 51
#define MESH_NEXTHDR_DEST 60

struct mesh_ext_header {
	__u8 nexthdr;
	__u8 hdrlen;
};

/* The pod-wide or per-port mode of the destination pod (MESH_MTLS_*), -1 if none. */
static __always_inline int mesh_dest_mode(const struct mesh_addr *pod, __u16 port)
{
	struct mesh_endpoint key = {};
	__u8 *mode;

	key.addr = *pod;
	key.port = port;
	mode = peer_auth.lookup(&key);
	if (!mode) {
		key.port = 0;
		mode = peer_auth.lookup(&key);
	}
	return mode ? *mode : -1;
}

/* Offset of the TCP header in an IPv6 packet, 0 if it carries no TCP, -1 if the
 * extension header chain is too long to follow. */
static __always_inline int mesh_ipv6_tcp_offset(struct __sk_buff *skb, __u8 nexthdr)
{
	struct mesh_ext_header ext;
	int offset = sizeof(struct ipv6hdr);
	int i;

#pragma unroll
	for (i = 0; i < MESH_MAX_EXT_HEADERS; i++) {
		switch (nexthdr) {
		case IPPROTO_TCP:
			return offset;
		case MESH_NEXTHDR_HOP:
		case MESH_NEXTHDR_ROUTING:
		case MESH_NEXTHDR_DEST:
		case MESH_NEXTHDR_FRAGMENT:
		case MESH_NEXTHDR_AUTH:
			break;
		default:
			return 0; /* UDP, ICMPv6, no next header, ... */
		}
		if (bpf_skb_load_bytes(skb, offset, &ext, sizeof(ext)) < 0)
			return -1;
		if (nexthdr == MESH_NEXTHDR_FRAGMENT)
			offset += 8;
		else if (nexthdr == MESH_NEXTHDR_AUTH)
			offset += (ext.hdrlen + 2) * 4;
		else
			offset += (ext.hdrlen + 1) * 8;
		nexthdr = ext.nexthdr;
	}
	return nexthdr == IPPROTO_TCP ? offset : -1;
}

int mesh_ingress(struct __sk_buff *skb)
{
	__u64 netns = bpf_get_netns_cookie(skb);
	struct mesh_addr src = {}, dst = {};
	struct mesh_pod *pod;
	struct tcphdr tcp;
	int offset;

	pod = mesh_netns.lookup(&netns);
	if (!pod)
		return MESH_PASS_PKT; /* not a meshed pod: no mTLS mode to enforce */

	/* cgroup_skb sees the packet from its network header */
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
			return MESH_PASS_PKT;
		if (ip.protocol != IPPROTO_TCP)
			return MESH_PASS_PKT;
		mesh_addr_from_ip4(&src, ip.saddr);
		mesh_addr_from_ip4(&dst, ip.daddr);
		offset = ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
			return MESH_PASS_PKT;
		src.ip6[0] = ip6.saddr.in6_u.u6_addr32[0];
		src.ip6[1] = ip6.saddr.in6_u.u6_addr32[1];
		src.ip6[2] = ip6.saddr.in6_u.u6_addr32[2];
		src.ip6[3] = ip6.saddr.in6_u.u6_addr32[3];
		dst.ip6[0] = ip6.daddr.in6_u.u6_addr32[0];
		dst.ip6[1] = ip6.daddr.in6_u.u6_addr32[1];
		dst.ip6[2] = ip6.daddr.in6_u.u6_addr32[2];
		dst.ip6[3] = ip6.daddr.in6_u.u6_addr32[3];
		offset = mesh_ipv6_tcp_offset(skb, ip6.nexthdr);
		if (offset == 0)
			return MESH_PASS_PKT;
	} else {
		return MESH_PASS_PKT;
	}

	if (offset > 0) {
		if (bpf_skb_load_bytes(skb, offset, &tcp, sizeof(tcp)) < 0)
			return MESH_PASS_PKT;
		if (!tcp.syn || tcp.ack)
			return MESH_PASS_PKT; /* only new connections are judged */
		if (mesh_dest_mode(&pod->addr, bpf_ntohs(tcp.dest)) != MESH_MTLS_STRICT)
			return MESH_PASS_PKT;
	} else if (mesh_dest_mode(&pod->addr, 0) != MESH_MTLS_STRICT) {
		return MESH_PASS_PKT; /* an unreadable header chain, to a pod not STRICT */
	}
	if (mesh_addr_equal(&src, &dst) || trusted_sources.lookup(&src))
		return MESH_PASS_PKT;
	mesh_count(MESH_CTR_STRICT_DROPPED);
	return MESH_DROP_PKT;
}
