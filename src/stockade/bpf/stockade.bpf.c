// SPDX-License-Identifier: Apache-2.0
/*
 * Stockade's eBPF datapath: one tc (clsact, direct-action) program per direction on each
 * interface of the host (or network namespace) it protects.
 *
 *   ingress  = inbound:  the peer is the packet's source      (DIR_IN)
 *   egress   = outbound: the peer is the packet's destination (DIR_OUT)
 *
 * Per packet, in order (the same precedence as nftables' base chains and the evaluator):
 *   1. not IPv4/IPv6 (ARP...), or not for this host (PACKET_OTHERHOST): not ours, pass;
 *   2. ICMPv6 neighbour discovery (types 133-137): always pass (failsafe);
 *   3. a later fragment follows the verdict its first fragment got (stk_frags);
 *   4. a packet of a known flow (stk_flows, either orientation) passes; a flow recorded
 *      under an older policy epoch is re-checked once against the policy now in force;
 *      an ICMP error about a known flow passes as "related";
 *   5. otherwise the packet opens a connection: the peer address is looked up in the
 *      generation's LPM trie (address -> identity: the exact combination of peer sets it is
 *      in), then (identity, direction, protocol, port or ICMP type) in the same trie,
 *      whose policy entries are disjoint port intervals already resolved by
 *      precedence (failsafe > override-deny > allow > deny) in user space. A miss is the
 *      mode's default. Two lookups, whatever the number of peers or rules.
 *
 * Allowed connections (and would-be drops in visibility mode) create a flow; every
 * new-connection verdict is reported on the stk_events ring buffer.
 *
 * Encryption (encrypt: true, WireGuard): a policy entry's verdict ALLOW_ENCRYPTED marks the
 * connection it opens as encrypted (flow_val.enc). The WireGuard interface's index is in
 * stk_current (0: no tunnel). A packet of an encrypted connection, or one that opens it:
 *   - at egress on any other interface is redirected into the tunnel (bpf_redirect to the
 *     WireGuard interface's egress: wireguard-go encrypts it; a tc egress hook runs after
 *     routing, so a mark could not re-route it), its SYN's MSS clamped to the tunnel's;
 *     with no tunnel (index 0, or the interface gone: the redirect fails) it is dropped;
 *   - at ingress is accepted only from the WireGuard interface, where WireGuard's
 *     cryptokey routing guarantees the inner source address belongs to the sending key;
 *     in the clear it is dropped, in every mode (never "would-block").
 * The WireGuard interface runs the same programs built for a link without an Ethernet
 * header (sections stockade/ingress_l3, stockade/egress_l3). wireguard-go's own UDP packets
 * carry its fwmark (stk_current.wg_mark) and pass egress untouched; the peers' WireGuard
 * UDP is accepted at ingress by failsafe policy entries rendered in user space.
 *
 * Generations: stk_gen is an array of two LPM tries, each holding one generation's peers
 * (kind PEER4/PEER6: address -> identity) and policy (kind POLICY: identity, direction,
 * protocol, port -> verdict, rule). The single entry of stk_current (a hash map, so an
 * update replaces the whole value atomically) names the generation in force (serial & 1),
 * the mode and the flow epoch; user space fills the idle generation and switches with one
 * update.
 *
 * Maps are plain symbols in section "stockade_maps": the Python loader creates the maps
 * and patches their descriptors into the instructions (no libbpf at run time).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define PACKET_OTHERHOST 3

#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58
#define PROTO_OTHER 255 /* policy key for every other protocol (port 0) */

#define DIR_IN 0
#define DIR_OUT 1

#define MODE_FULL 1
#define MODE_SELECTIVE 2
#define MODE_VISIBILITY 3

#define VERDICT_ALLOW 1
#define VERDICT_BLOCK 2
#define VERDICT_ALLOW_ENCRYPTED 3 /* allowed only through the WireGuard tunnel */

#define ACT_ALLOW 1
#define ACT_BLOCK 2
#define ACT_WOULD_BLOCK 3

#define REASON_NEW 1       /* first packet of a connection */
#define REASON_REVALIDATED 2 /* a flow re-checked after a policy change, verdict changed */

#define FRAG_NONE 0
#define FRAG_FIRST 1
#define FRAG_LATER 2

#define PASS TC_ACT_UNSPEC /* continue with the next tc filter, if any */
#define DROP TC_ACT_SHOT

/* What happens to a packet: dropped, passed, or (encrypted) through the tunnel only. */
#define GO_DROP 0
#define GO_PASS 1
#define GO_TUNNEL 2

#define TUNNEL_MSS 1360 /* WireGuard MTU 1420 - IPv6 (40) - TCP (20): fits both families */

#define NSEC 1000000000ULL
#define TIMEOUT_TCP (5ULL * 24 * 3600 * NSEC)
#define TIMEOUT_UDP (180ULL * NSEC)
#define TIMEOUT_ICMP (30ULL * NSEC)
#define TIMEOUT_OTHER (600ULL * NSEC)
#define TIMEOUT_FRAG (30ULL * NSEC)

enum stat {
	STAT_PASS_FLOW,
	STAT_ALLOW_NEW,
	STAT_BLOCK,
	STAT_WOULD_BLOCK,
	STAT_PASS_ND,
	STAT_PASS_RELATED,
	STAT_REVALIDATED,
	STAT_REVOKED,
	STAT_FRAG_PASS,
	STAT_FRAG_DROP,
	STAT_NOT_IP,
	STAT_MALFORMED,
	STAT_EVENTS_LOST,
	STAT_OTHERHOST,
	STAT_TUNNELED,    /* redirected into the WireGuard interface */
	STAT_PLAIN_DROP,  /* an encrypted rule's traffic in the clear (or no tunnel): dropped */
	STAT_MAX,
};

struct stk_current {
	__u32 serial; /* full applies; generation = serial & 1 */
	__u32 epoch;  /* bumped by every change (apply or delta): flows re-check */
	__u32 mode;
	__u32 layout;  /* map layout version (user space only) */
	__u64 object;  /* digest of the loaded object file (user space only) */
	__u32 wg_ifindex; /* the WireGuard interface (0: none): encrypted traffic only through it */
	__u32 wg_mark;    /* wireguard-go's fwmark: its own UDP packets pass egress */
};

/* The generation trie holds three kinds of entries, told apart by the first key byte. */
#define KIND_POLICY 1
#define KIND_PEER4 4
#define KIND_PEER6 6

struct gen_key {
	__u32 prefixlen; /* 8 (kind) + the bits that matter below */
	__u8 kind;
	__u8 data[16]; /* peer: the address; policy: identity (BE 4), dir, proto, port (BE 2) */
	__u8 pad[3];
};

struct gen_val {
	__u32 a; /* peer: identity; policy: verdict */
	__u32 b; /* policy: rule index */
};

struct flow_key {
	__u8 family;
	__u8 proto;
	__u16 pad;
	__u16 sport; /* ICMP echo: identifier */
	__u16 dport; /* ICMP echo: 0 */
	__u8 src[16];
	__u8 dst[16];
};

struct flow_val {
	__u64 last_ns;
	__u32 epoch;
	__u32 rule;
	__u8 dir; /* direction of the connection's first packet at this host */
	__u8 action;
	__u8 enc; /* encrypted: only through the WireGuard interface */
	__u8 pad;
	__u32 pad2;
};

struct frag_key {
	__u8 family;
	__u8 proto;
	__u16 pad;
	__u32 id;
	__u8 src[16];
	__u8 dst[16];
};

struct frag_val {
	__u64 last_ns;
	__u8 pass; /* GO_DROP, GO_PASS or GO_TUNNEL */
	__u8 pad[7];
};

struct stk_event {
	__u64 ts_ns;
	__u32 serial;
	__u32 rule;
	__u8 family;
	__u8 proto;
	__u8 dir;
	__u8 action;
	__u8 reason;
	__u8 icmp_type;
	__u16 pad;
	__u16 sport;
	__u16 dport;
	__u32 ifindex;
	__u8 src[16];
	__u8 dst[16];
};

/* Map symbols: created and bound by the loader (see ebpf_loader.py for their types). */
struct stk_map_ref {
	int unused;
};
#define STK_MAP(name) struct stk_map_ref name __attribute__((section("stockade_maps"), used))
STK_MAP(stk_current); /* hash u32 -> struct stk_current, 1 entry */
STK_MAP(stk_gen);     /* array of 2 LPM tries gen_key -> gen_val, one per generation */
STK_MAP(stk_flows);   /* LRU hash flow_key -> flow_val */
STK_MAP(stk_frags);   /* LRU hash frag_key -> frag_val */
STK_MAP(stk_events);  /* ring buffer of struct stk_event */
STK_MAP(stk_stats);   /* per-CPU array of u64 counters, enum stat */

struct pkt {
	__u8 family;
	__u8 proto;
	__u8 frag;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 pad[3];
	__u16 sport;
	__u16 dport;
	__u32 frag_id;
	__u32 l4off;
	__u8 src[16];
	__u8 dst[16];
};

struct query {
	__u8 family;
	__u8 dir;
	__u8 proto;
	__u8 pad;
	__u16 port; /* network order */
	__u16 pad2;
	__u8 peer[16];
};

#define PARSE_OK 0
#define PARSE_NOT_IP 1
#define PARSE_BAD 2

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&stk_stats, &which);
	if (c)
		*c += 1;
}

static __always_inline int is_echo_request(__u8 family, __u8 type)
{
	return family == 4 ? type == 8 : type == 128;
}

static __always_inline int is_echo_reply(__u8 family, __u8 type)
{
	return family == 4 ? type == 0 : type == 129;
}

static __always_inline int is_icmp_error(__u8 family, __u8 type)
{
	if (family == 4)
		return type == 3 || type == 4 || type == 5 || type == 11 || type == 12;
	return type >= 1 && type <= 4;
}

static __always_inline int is_icmp(__u8 family, __u8 proto)
{
	return family == 4 ? proto == PROTO_ICMP : proto == PROTO_ICMPV6;
}

/* IPv4/IPv6 header at off (IPv6 extension headers skipped), then the L4 ports/type. */
static __always_inline int parse_ip(struct __sk_buff *skb, __u32 off, __u16 ethertype, struct pkt *p,
				    int inner)
{
	if (ethertype == bpf_htons(ETH_P_IP)) {
		__u8 h[20];
		if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
			return PARSE_BAD;
		__u8 ihl = h[0] & 0x0f;
		if ((h[0] >> 4) != 4 || ihl < 5)
			return PARSE_BAD;
		p->family = 4;
		p->proto = h[9];
		__builtin_memcpy(p->src, &h[12], 4);
		__builtin_memcpy(p->dst, &h[16], 4);
		__u16 fo = ((__u16)h[6] << 8) | h[7];
		if (fo & 0x1fff)
			p->frag = FRAG_LATER;
		else if (fo & 0x2000)
			p->frag = FRAG_FIRST;
		p->frag_id = ((__u32)h[4] << 8) | h[5];
		off += (__u32)ihl * 4;
	} else if (ethertype == bpf_htons(ETH_P_IPV6)) {
		__u8 h[40];
		if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
			return PARSE_BAD;
		if ((h[0] >> 4) != 6)
			return PARSE_BAD;
		p->family = 6;
		__builtin_memcpy(p->src, &h[8], 16);
		__builtin_memcpy(p->dst, &h[24], 16);
		__u8 nh = h[6];
		off += 40;
		if (!inner) {
#pragma unroll
			for (int i = 0; i < 6; i++) {
				__u8 x[8];
				if (nh == 0 || nh == 43 || nh == 60) { /* hop-by-hop, routing, destination */
					if (bpf_skb_load_bytes(skb, off, x, 2) < 0)
						return PARSE_BAD;
					nh = x[0];
					off += ((__u32)x[1] + 1) * 8;
				} else if (nh == 44) { /* fragment */
					if (bpf_skb_load_bytes(skb, off, x, 8) < 0)
						return PARSE_BAD;
					nh = x[0];
					__u16 fo = ((__u16)x[2] << 8) | x[3];
					if (fo & 0xfff8)
						p->frag = FRAG_LATER;
					else if (fo & 1)
						p->frag = FRAG_FIRST;
					p->frag_id = ((__u32)x[4] << 24) | ((__u32)x[5] << 16) | ((__u32)x[6] << 8) | x[7];
					off += 8;
				} else if (nh == 51) { /* authentication header */
					if (bpf_skb_load_bytes(skb, off, x, 2) < 0)
						return PARSE_BAD;
					nh = x[0];
					off += ((__u32)x[1] + 2) * 4;
				} else {
					break;
				}
			}
		}
		p->proto = nh;
	} else {
		return PARSE_NOT_IP;
	}
	p->l4off = off;
	if (p->frag == FRAG_LATER)
		return PARSE_OK;
	if (p->proto == PROTO_TCP) {
		__u8 t[14];
		if (bpf_skb_load_bytes(skb, off, t, inner ? 4 : sizeof(t)) < 0)
			return PARSE_BAD;
		__builtin_memcpy(&p->sport, &t[0], 2);
		__builtin_memcpy(&p->dport, &t[2], 2);
		p->tcp_flags = inner ? 0 : t[13];
	} else if (p->proto == PROTO_UDP) {
		__u8 u[4];
		if (bpf_skb_load_bytes(skb, off, u, sizeof(u)) < 0)
			return PARSE_BAD;
		__builtin_memcpy(&p->sport, &u[0], 2);
		__builtin_memcpy(&p->dport, &u[2], 2);
	} else if (is_icmp(p->family, p->proto)) {
		__u8 c[8];
		if (bpf_skb_load_bytes(skb, off, c, sizeof(c)) < 0)
			return PARSE_BAD;
		p->icmp_type = c[0];
		__builtin_memcpy(&p->sport, &c[4], 2); /* echo identifier */
	}
	return PARSE_OK;
}

/* The flow key of packet p; swap: the key of its reply (addresses and ports swapped). */
static __always_inline void flow_key_of(const struct pkt *p, int swap, struct flow_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->family = p->family;
	k->proto = p->proto;
	if (swap) {
		__builtin_memcpy(k->src, p->dst, 16);
		__builtin_memcpy(k->dst, p->src, 16);
	} else {
		__builtin_memcpy(k->src, p->src, 16);
		__builtin_memcpy(k->dst, p->dst, 16);
	}
	if (is_icmp(p->family, p->proto)) {
		k->sport = p->sport; /* echo identifier, in both directions */
		k->dport = 0;
	} else if (p->proto == PROTO_TCP || p->proto == PROTO_UDP) {
		k->sport = swap ? p->dport : p->sport;
		k->dport = swap ? p->sport : p->dport;
	}
}

static __always_inline __u64 flow_timeout(__u8 family, __u8 proto)
{
	if (proto == PROTO_TCP)
		return TIMEOUT_TCP;
	if (proto == PROTO_UDP)
		return TIMEOUT_UDP;
	if (is_icmp(family, proto))
		return TIMEOUT_ICMP;
	return TIMEOUT_OTHER;
}

/* Policy verdict for a connection: (verdict << 32) | rule index. */
static __always_inline __u64 evaluate(const struct stk_current *cur, const struct query *q)
{
	__u32 gen = cur->serial & 1;
	__u64 miss = (__u64)(cur->mode == MODE_SELECTIVE ? VERDICT_ALLOW : VERDICT_BLOCK) << 32;
	void *trie = bpf_map_lookup_elem(&stk_gen, &gen);
	if (!trie)
		return miss;
	struct gen_key k = {};
	__u32 ident = 0;
	if (q->family == 4) {
		k.prefixlen = 8 + 32;
		k.kind = KIND_PEER4;
		__builtin_memcpy(k.data, q->peer, 4);
	} else {
		k.prefixlen = 8 + 128;
		k.kind = KIND_PEER6;
		__builtin_memcpy(k.data, q->peer, 16);
	}
	struct gen_val *v = bpf_map_lookup_elem(trie, &k);
	if (v)
		ident = v->a;

	__builtin_memset(&k, 0, sizeof(k));
	k.prefixlen = 8 + 64;
	k.kind = KIND_POLICY;
	__u32 ident_be = bpf_htonl(ident);
	__builtin_memcpy(k.data, &ident_be, 4);
	k.data[4] = q->dir;
	__u16 port = q->port;
	if (q->proto == PROTO_TCP || q->proto == PROTO_UDP || is_icmp(q->family, q->proto)) {
		k.data[5] = q->proto;
	} else {
		k.data[5] = PROTO_OTHER;
		port = 0;
	}
	__builtin_memcpy(&k.data[6], &port, 2);
	v = bpf_map_lookup_elem(trie, &k);
	if (v)
		return ((__u64)v->a << 32) | v->b;
	return miss;
}

static __always_inline void report(struct __sk_buff *skb, const struct stk_current *cur, const struct flow_key *k,
				   __u8 dir, __u8 action, __u32 rule, __u8 reason, __u8 icmp_type)
{
	struct stk_event e = {};
	e.ts_ns = bpf_ktime_get_ns();
	e.serial = cur->serial;
	e.rule = rule;
	e.family = k->family;
	e.proto = k->proto;
	e.dir = dir;
	e.action = action;
	e.reason = reason;
	e.icmp_type = icmp_type;
	e.sport = k->sport;
	e.dport = k->dport;
	e.ifindex = skb->ifindex;
	__builtin_memcpy(e.src, k->src, 16);
	__builtin_memcpy(e.dst, k->dst, 16);
	if (bpf_ringbuf_output(&stk_events, &e, sizeof(e), 0) < 0)
		count(STAT_EVENTS_LOST);
}

/* A SYN (or SYN-ACK) going into the tunnel: its MSS option (Linux writes it first) clamped to
 * the tunnel's, so segments sized for the Ethernet link do not exceed the WireGuard MTU. */
static __always_inline void clamp_mss(struct __sk_buff *skb, const struct pkt *p)
{
	if (p->proto != PROTO_TCP || !(p->tcp_flags & 0x02) || p->frag != FRAG_NONE)
		return;
	__u8 opt[4];
	if (bpf_skb_load_bytes(skb, p->l4off + 20, opt, sizeof(opt)) < 0)
		return;
	if (opt[0] != 2 || opt[1] != 4)
		return;
	__u16 old = ((__u16)opt[2] << 8) | opt[3];
	if (old <= TUNNEL_MSS)
		return;
	__be16 from = bpf_htons(old), to = bpf_htons(TUNNEL_MSS);
	bpf_l4_csum_replace(skb, p->l4off + 16, from, to, sizeof(to));
	bpf_skb_store_bytes(skb, p->l4off + 22, &to, sizeof(to), 0);
}

/* The packet's fate: GO_TUNNEL passes on the WireGuard interface, is redirected into it at
 * egress elsewhere and dropped at ingress elsewhere (in the clear). */
static __always_inline int deliver(struct __sk_buff *skb, const struct stk_current *cur, const struct pkt *p,
				   int go, __u8 dir, int on_wg)
{
	if (go == GO_DROP)
		return DROP;
	if (go == GO_PASS || on_wg)
		return PASS;
	if (dir == DIR_IN || cur->wg_ifindex == 0) {
		count(STAT_PLAIN_DROP);
		return DROP;
	}
	clamp_mss(skb, p);
	count(STAT_TUNNELED);
	return bpf_redirect(cur->wg_ifindex, 0);
}

static __always_inline int remember_fragment(struct __sk_buff *skb, const struct stk_current *cur,
					     const struct pkt *p, int go, __u8 dir, int on_wg)
{
	if (p->frag == FRAG_FIRST) {
		struct frag_key fk = {};
		fk.family = p->family;
		fk.proto = p->proto;
		fk.id = p->frag_id;
		__builtin_memcpy(fk.src, p->src, 16);
		__builtin_memcpy(fk.dst, p->dst, 16);
		struct frag_val fv = {};
		fv.last_ns = bpf_ktime_get_coarse_ns();
		fv.pass = go;
		bpf_map_update_elem(&stk_frags, &fk, &fv, BPF_ANY);
	}
	return deliver(skb, cur, p, go, dir, on_wg);
}

static __always_inline int later_fragment(struct __sk_buff *skb, const struct stk_current *cur,
					  const struct pkt *p, __u8 dir, int on_wg)
{
	struct frag_key fk = {};
	fk.family = p->family;
	fk.proto = p->proto;
	fk.id = p->frag_id;
	__builtin_memcpy(fk.src, p->src, 16);
	__builtin_memcpy(fk.dst, p->dst, 16);
	struct frag_val *fv = bpf_map_lookup_elem(&stk_frags, &fk);
	int go;
	if (fv && bpf_ktime_get_coarse_ns() - fv->last_ns < TIMEOUT_FRAG)
		go = fv->pass;
	else /* first fragment never seen: the mode's default */
		go = cur->mode != MODE_FULL ? GO_PASS : GO_DROP;
	count(go != GO_DROP ? STAT_FRAG_PASS : STAT_FRAG_DROP);
	return deliver(skb, cur, p, go, dir, on_wg);
}

/* An ICMP error about a flow we know passes as related (GO_TUNNEL for an encrypted one). */
static __always_inline int related_flow(struct __sk_buff *skb, const struct stk_current *cur, const struct pkt *p)
{
	struct pkt inner = {};
	__u16 ethertype = p->family == 4 ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6);
	if (parse_ip(skb, p->l4off + 8, ethertype, &inner, 1) != PARSE_OK)
		return GO_DROP;
	if (inner.frag == FRAG_LATER)
		return GO_DROP;
	struct flow_key k;
	flow_key_of(&inner, 0, &k);
	struct flow_val *v = bpf_map_lookup_elem(&stk_flows, &k);
	if (!v) {
		flow_key_of(&inner, 1, &k);
		v = bpf_map_lookup_elem(&stk_flows, &k);
	}
	if (!v || v->epoch != cur->epoch)
		return GO_DROP;
	return v->enc ? GO_TUNNEL : GO_PASS;
}

static __always_inline int stk_filter(struct __sk_buff *skb, const __u8 dir, const __u32 l2len)
{
	__u32 zero = 0;
	struct stk_current *cur = bpf_map_lookup_elem(&stk_current, &zero);
	if (!cur)
		return PASS; /* nothing configured */
	if (dir == DIR_IN && skb->pkt_type == PACKET_OTHERHOST) {
		count(STAT_OTHERHOST);
		return PASS; /* not for this host: the stack drops it */
	}
	if (dir == DIR_OUT && cur->wg_mark != 0 && skb->mark == cur->wg_mark)
		return PASS; /* wireguard-go's own (encrypted) UDP packets */
	int on_wg = cur->wg_ifindex != 0 && skb->ifindex == cur->wg_ifindex;
	struct pkt p = {};
	int parsed = parse_ip(skb, l2len, (__u16)skb->protocol, &p, 0);
	if (parsed == PARSE_NOT_IP) {
		count(STAT_NOT_IP);
		return PASS;
	}
	if (parsed != PARSE_OK) {
		count(STAT_MALFORMED);
		return cur->mode == MODE_FULL ? DROP : PASS;
	}
	int icmp = is_icmp(p.family, p.proto);
	if (icmp && p.family == 6 && p.icmp_type >= 133 && p.icmp_type <= 137) {
		count(STAT_PASS_ND);
		return PASS;
	}
	if (p.frag == FRAG_LATER)
		return later_fragment(skb, cur, &p, dir, on_wg);

	__u64 now = bpf_ktime_get_coarse_ns();
	struct flow_key k;
	struct flow_val *v = 0;
	int syn = p.proto == PROTO_TCP && (p.tcp_flags & 0x12) == 0x02; /* SYN without ACK: a new connection */
	int echo_req = icmp && is_echo_request(p.family, p.icmp_type);
	int echo_rep = icmp && is_echo_reply(p.family, p.icmp_type);
	int trackable = !icmp || echo_req || echo_rep;
	if (trackable && !syn) {
		if (!echo_rep) {
			flow_key_of(&p, 0, &k);
			v = bpf_map_lookup_elem(&stk_flows, &k);
		}
		if (!v && !echo_req) {
			flow_key_of(&p, 1, &k);
			v = bpf_map_lookup_elem(&stk_flows, &k);
		}
		if (v && now - v->last_ns > flow_timeout(p.family, p.proto))
			v = 0; /* expired: a new connection */
	}
	if (v && v->epoch == cur->epoch) {
		if (now - v->last_ns > NSEC)
			v->last_ns = now;
		count(STAT_PASS_FLOW);
		return remember_fragment(skb, cur, &p, v->enc ? GO_TUNNEL : GO_PASS, dir, on_wg);
	}
	if (!v && icmp && is_icmp_error(p.family, p.icmp_type)) {
		int related = related_flow(skb, cur, &p);
		if (related != GO_DROP) {
			count(STAT_PASS_RELATED);
			return remember_fragment(skb, cur, &p, related, dir, on_wg);
		}
	}

	/* What to evaluate: the flow's first packet (re-check after a policy change) or this one. */
	struct query q = {};
	q.family = p.family;
	if (v) {
		q.dir = v->dir;
		q.proto = k.proto;
		__builtin_memcpy(q.peer, v->dir == DIR_IN ? k.src : k.dst, 16);
		if (icmp)
			q.port = bpf_htons(p.family == 4 ? 8 : 128);
		else
			q.port = k.dport;
	} else {
		flow_key_of(&p, 0, &k);
		q.dir = dir;
		q.proto = p.proto;
		__builtin_memcpy(q.peer, dir == DIR_IN ? p.src : p.dst, 16);
		q.port = icmp ? bpf_htons(p.icmp_type) : p.dport;
	}
	__u64 res = evaluate(cur, &q);
	__u32 rule = (__u32)res;
	__u32 verdict = (__u32)(res >> 32);
	__u8 enc = verdict == VERDICT_ALLOW_ENCRYPTED;
	__u8 action = ACT_ALLOW;
	if (verdict != VERDICT_ALLOW && !enc)
		action = cur->mode == MODE_VISIBILITY ? ACT_WOULD_BLOCK : ACT_BLOCK;
	else if (enc && !on_wg && (dir == DIR_IN || cur->wg_ifindex == 0))
		action = ACT_BLOCK; /* in the clear, or no tunnel to send it through: in every mode */

	if (v) {
		if (action == ACT_BLOCK) {
			bpf_map_delete_elem(&stk_flows, &k);
			count(STAT_REVOKED);
			report(skb, cur, &k, v->dir, action, rule, REASON_REVALIDATED, 0);
			return remember_fragment(skb, cur, &p, GO_DROP, dir, on_wg);
		}
		if (action != v->action || enc != v->enc)
			report(skb, cur, &k, v->dir, action, rule, REASON_REVALIDATED, 0);
		v->epoch = cur->epoch;
		v->rule = rule;
		v->action = action;
		v->enc = enc;
		v->last_ns = now;
		count(STAT_REVALIDATED);
		return remember_fragment(skb, cur, &p, enc ? GO_TUNNEL : GO_PASS, dir, on_wg);
	}

	report(skb, cur, &k, dir, action, rule, REASON_NEW, icmp ? p.icmp_type : 0);
	if (action == ACT_BLOCK) {
		count(enc ? STAT_PLAIN_DROP : STAT_BLOCK);
		if (syn)
			bpf_map_delete_elem(&stk_flows, &k); /* a stale flow of a reused 5-tuple */
		return remember_fragment(skb, cur, &p, GO_DROP, dir, on_wg);
	}
	count(action == ACT_ALLOW ? STAT_ALLOW_NEW : STAT_WOULD_BLOCK);
	if (trackable && !echo_rep) {
		struct flow_val nv = {};
		nv.last_ns = now;
		nv.epoch = cur->epoch;
		nv.rule = rule;
		nv.dir = dir;
		nv.action = action;
		nv.enc = enc;
		bpf_map_update_elem(&stk_flows, &k, &nv, BPF_ANY);
	}
	return remember_fragment(skb, cur, &p, enc ? GO_TUNNEL : GO_PASS, dir, on_wg);
}

SEC("stockade/ingress")
int stockade_in(struct __sk_buff *skb)
{
	return stk_filter(skb, DIR_IN, ETH_HLEN);
}

SEC("stockade/egress")
int stockade_out(struct __sk_buff *skb)
{
	return stk_filter(skb, DIR_OUT, ETH_HLEN);
}

/* The same, for the WireGuard interface (a tun device: no link-layer header). */
SEC("stockade/ingress_l3")
int stockade_in_l3(struct __sk_buff *skb)
{
	return stk_filter(skb, DIR_IN, 0);
}

SEC("stockade/egress_l3")
int stockade_out_l3(struct __sk_buff *skb)
{
	return stk_filter(skb, DIR_OUT, 0);
}

char _license[] SEC("license") = "Apache-2.0";
