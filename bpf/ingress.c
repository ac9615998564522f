/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ingress.c - cgroup_skb/ingress: STRICT peer authentication in the kernel.
 * A new TCP connection (SYN) to a pod whose mode is STRICT is dropped unless
 * it comes from the node itself (its proxy delivering tunnelled traffic, or
 * kubelet probes) or from the pod to itself. Everything else passes: existing
 * connections, other protocols, PERMISSIVE and DISABLE pods.
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>

#define MESH_PASS 1
#define MESH_DROP 0

int mesh_ingress(struct __sk_buff *skb)
{
	struct mesh_endpoint key = {};
	struct tcphdr tcp;
	struct iphdr ip;
	__u8 *mode;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return MESH_PASS;
	/* cgroup_skb sees the packet from its network header */
	if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
		return MESH_PASS;
	if (ip.protocol != IPPROTO_TCP)
		return MESH_PASS;
	if (bpf_skb_load_bytes(skb, ip.ihl * 4, &tcp, sizeof(tcp)) < 0)
		return MESH_PASS;
	if (!tcp.syn || tcp.ack)
		return MESH_PASS; /* only new connections are judged */

	key.ip4 = ip.daddr;
	key.port = bpf_ntohs(tcp.dest);
	mode = peer_auth.lookup(&key);
	if (!mode) {
		key.port = 0;
		mode = peer_auth.lookup(&key);
	}
	if (!mode || *mode != MESH_MTLS_STRICT)
		return MESH_PASS;
	if (ip.saddr == ip.daddr || trusted_sources.lookup(&ip.saddr))
		return MESH_PASS;
	mesh_count(MESH_CTR_STRICT_DROPPED);
	return MESH_DROP;
}
