/* SPDX-License-Identifier: Apache-2.0 */
/*
 * redirect.c - the decision connect4.c and connect6.c share: which connects of
 * a meshed pod go to the node proxy, which are left alone, and which are
 * refused because the proxy could not carry them (refusing is the only safe
 * answer there: letting them through would bypass mTLS and policy).
 * A library file joined into the compile unit (see counters.c for why).
 */
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>

#define MESH_LOOPBACK_NET 127 /* first octet of 127.0.0.0/8 */
#define MESH_V4MAPPED_WORD 0x0000ffff /* third word of ::ffff:a.b.c.d, host order */
#define MESH_LINK_LOCAL_MASK 0xffc00000 /* fe80::/10, first word, host order */
#define MESH_LINK_LOCAL_NET 0xfe800000
#define MESH_ALLOW 1 /* sock_addr return: the (possibly rewritten) connect proceeds */
#define MESH_REFUSE 0 /* sock_addr return: connect() fails with EPERM */
#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif

enum mesh_verdict {
	MESH_PASS, /* not ours to steer: the pod itself, the proxy, an excluded port */
	MESH_REDIRECT, /* to the node proxy */
	MESH_DENY, /* cannot be meshed: refuse */
};

static __always_inline void mesh_addr_from_ip4(struct mesh_addr *a, __u32 ip4)
{
	a->ip6[0] = 0;
	a->ip6[1] = 0;
	a->ip6[2] = bpf_htonl(MESH_V4MAPPED_WORD);
	a->ip6[3] = ip4;
}

static __always_inline int mesh_addr_is_v4mapped(const struct mesh_addr *a)
{
	return a->ip6[0] == 0 && a->ip6[1] == 0 && a->ip6[2] == bpf_htonl(MESH_V4MAPPED_WORD);
}

static __always_inline int mesh_addr_equal(const struct mesh_addr *a, const struct mesh_addr *b)
{
	return a->ip6[0] == b->ip6[0] && a->ip6[1] == b->ip6[1] && a->ip6[2] == b->ip6[2] &&
	       a->ip6[3] == b->ip6[3];
}

static __always_inline int mesh_addr_is_proxy6(const struct mesh_addr *a)
{
	return a->ip6[0] == bpf_htonl(MESH_PROXY_IP6_0) && a->ip6[1] == bpf_htonl(MESH_PROXY_IP6_1) &&
	       a->ip6[2] == bpf_htonl(MESH_PROXY_IP6_2) && a->ip6[3] == bpf_htonl(MESH_PROXY_IP6_3);
}

static __always_inline int mesh_has_proxy6(void)
{
	return (MESH_PROXY_IP6_0 | MESH_PROXY_IP6_1 | MESH_PROXY_IP6_2 | MESH_PROXY_IP6_3) != 0;
}

/* Where `dst` stays inside the pod (loopback, or the unspecified address, which
 * connect() takes as this host). */
static __always_inline int mesh_addr_is_local(const struct mesh_addr *a)
{
	__u32 w0 = bpf_ntohl(a->ip6[0]), w3 = bpf_ntohl(a->ip6[3]);

	if (mesh_addr_is_v4mapped(a))
		return (w3 >> 24) == MESH_LOOPBACK_NET || w3 == 0;
	if (w0 || a->ip6[1] || a->ip6[2])
		return 0;
	return w3 == 0 || w3 == 1; /* :: and ::1 */
}

/* The verdict on a TCP connect of a meshed pod's socket. */
static __always_inline enum mesh_verdict mesh_classify(const struct mesh_addr *dst, __u16 port)
{
	if (mesh_addr_is_local(dst))
		return MESH_PASS;
	if (mesh_addr_is_v4mapped(dst)) {
		if (dst->ip6[3] == bpf_htonl(MESH_PROXY_IP4))
			return MESH_PASS;
	} else {
		if (mesh_has_proxy6() && mesh_addr_is_proxy6(dst))
			return MESH_PASS;
		/* A link-local address names a pod only on one link: the proxy cannot
		 * tell whom it reaches, so no policy could apply. Refused. */
		if ((bpf_ntohl(dst->ip6[0]) & MESH_LINK_LOCAL_MASK) == MESH_LINK_LOCAL_NET)
			return MESH_DENY;
	}
	if (excluded_ports.lookup(&port)) {
		mesh_count(MESH_CTR_EXCLUDED);
		return MESH_PASS;
	}
	if (!mesh_addr_is_v4mapped(dst) && !mesh_has_proxy6())
		return MESH_DENY; /* no IPv6 proxy on this node to carry it */
	return MESH_REDIRECT;
}

/* Remember where a redirected socket meant to go: under its cookie until the
 * handshake completes (sockops.c), and on the socket for getpeername(). */
static __always_inline void mesh_remember(struct bpf_sock_addr *ctx, struct mesh_endpoint *orig)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct mesh_endpoint *stored;

	inflight.update(&cookie, orig);
	stored = sock_orig.sk_storage_get(ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (stored)
		*stored = *orig;
	mesh_count(MESH_CTR_REDIRECTED);
}

/*
 * Whether this connect is one to judge: a TCP socket of a meshed pod. UDP, SCTP
 * and the rest are not meshed (README, "What is meshed"). MPTCP is refused
 * outright (MESH_DENY): it would split the connection into subflows the proxy
 * never sees as one. A meshed pod's flags (its fail mode) go to `flags`.
 */
static __always_inline enum mesh_verdict mesh_screen(struct bpf_sock_addr *ctx, __u32 *flags)
{
	struct mesh_pod *pod;
	__u64 netns;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_MPTCP)
		return MESH_PASS;
	netns = bpf_get_netns_cookie(ctx);
	pod = mesh_netns.lookup(&netns);
	if (!pod)
		return MESH_PASS;
	*flags = pod->flags;
	return ctx->protocol == IPPROTO_MPTCP ? MESH_DENY : MESH_REDIRECT;
}

/* Whether the node's agent is up: its heartbeat (meshagent.h) is younger than
 * the timeout. Never written (0) counts as down. */
static __always_inline int mesh_agent_alive(void)
{
	__u32 key = 0;
	struct mesh_heartbeat *hb = heartbeat.lookup(&key);
	__u64 timeout;

	if (!hb || !hb->beat_ns)
		return 0;
	timeout = hb->timeout_ns ? hb->timeout_ns : MESH_HEARTBEAT_TIMEOUT_NS;
	return bpf_ktime_get_ns() < hb->beat_ns + timeout;
}

/* screen, then classify: the one verdict each connect program acts on. Counts
 * refusals, so the programs only rewrite. While the agent is down there is no
 * proxy to redirect to: a fail-open pod's connect goes to its original
 * destination, a fail-closed pod's is refused at once (EPERM), not sent to a
 * listener that is not there. What would not be redirected anyway (the pod
 * itself, excluded ports, MPTCP and link-local refusals) is unchanged. */
static __always_inline enum mesh_verdict mesh_decide(struct bpf_sock_addr *ctx,
						     const struct mesh_endpoint *orig)
{
	__u32 flags = 0;
	enum mesh_verdict verdict = mesh_screen(ctx, &flags);

	if (verdict == MESH_REDIRECT)
		verdict = mesh_classify(&orig->addr, orig->port);
	if (verdict == MESH_REDIRECT && !mesh_agent_alive()) {
		if (flags & MESH_POD_FAIL_OPEN) {
			mesh_count(MESH_CTR_FAIL_OPEN);
			return MESH_PASS;
		}
		mesh_count(MESH_CTR_FAIL_CLOSED);
		return MESH_DENY;
	}
	if (verdict == MESH_DENY)
		mesh_count(MESH_CTR_REFUSED);
	return verdict;
}
