# ---- ippool.conf (ippool -f) ----
# Stockade ippool.conf: workload web-1 (slot a)
table role = ipf type = tree number = 10000
	{ 10.0.0.0/8; 10.0.0.1/32; 172.16.0.0/12; };
table role = ipf type = tree number = 10001
	{ 192.0.2.0/24; };
table role = ipf type = tree number = 10002
	{ fd00::/48; };
table role = ipf type = tree number = 10003
	{ 2001:db8::/32; };

# ---- ipf.conf (ipf -I -f) ----
# Stockade ipf.conf: workload web-1, mode full
pass in quick on lo0 all # failsafe:loopback
pass out quick on lo0 all # failsafe:loopback
pass in quick proto tcp from any to any port = 22 flags S/SA keep state # failsafe:management
pass in quick proto tcp from pool/10000 to any port = 22 flags S/SA keep state # ruleset/corp/0
pass in quick proto tcp from pool/10000 to any port = 443 flags S/SA keep state # ruleset/corp/0
block out quick from any to pool/10001 # deny/docs
block in quick all # default
block out quick all # default

# ---- ipf6.conf (ipf -6 -I -f) ----
# Stockade ipf6.conf: workload web-1, mode full
pass in quick on lo0 all # failsafe:loopback
pass out quick on lo0 all # failsafe:loopback
pass in quick proto ipv6-icmp from any to any icmp-type 133 # failsafe:nd
pass in quick proto ipv6-icmp from any to any icmp-type 134 # failsafe:nd
pass in quick proto ipv6-icmp from any to any icmp-type 135 # failsafe:nd
pass in quick proto ipv6-icmp from any to any icmp-type 136 # failsafe:nd
pass in quick proto ipv6-icmp from any to any icmp-type 137 # failsafe:nd
pass out quick proto ipv6-icmp from any to any icmp-type 133 # failsafe:nd
pass out quick proto ipv6-icmp from any to any icmp-type 134 # failsafe:nd
pass out quick proto ipv6-icmp from any to any icmp-type 135 # failsafe:nd
pass out quick proto ipv6-icmp from any to any icmp-type 136 # failsafe:nd
pass out quick proto ipv6-icmp from any to any icmp-type 137 # failsafe:nd
pass in quick proto tcp from any to any port = 22 flags S/SA keep state # failsafe:management
pass in quick proto tcp from pool/10002 to any port = 22 flags S/SA keep state # ruleset/corp/0
pass in quick proto tcp from pool/10002 to any port = 443 flags S/SA keep state # ruleset/corp/0
block out quick from any to pool/10003 # deny/docs
block in quick all # default
block out quick all # default
