# ---- ippool.conf (ippool -f) ----
# Stockade ippool.conf: workload web-1 (slot a)
table role = ipf type = tree number = 10000
	{ 192.0.2.0/24; };
table role = ipf type = tree number = 10001
	{ 10.0.0.0/8; 10.0.0.1/32; 172.16.0.0/12; };
table role = ipf type = tree number = 10002
	{ 2001:db8::/32; };
table role = ipf type = tree number = 10003
	{ fd00::/48; };

# ---- ipf.conf (ipf -I -f) ----
# Stockade ipf.conf: workload web-1, mode full
pass in quick on lo0 all # failsafe:loopback
pass out quick on lo0 all # failsafe:loopback
pass in quick proto tcp from any to any port = 22 flags S/SA keep state # failsafe:management
block in quick from pool/10000 to any # deny/quarantine
block out quick proto tcp from any to pool/10000 port = 25 # deny/quarantine-out
block out quick proto udp from any to pool/10000 port = 53 # deny/quarantine-out
pass in quick proto tcp from pool/10001 to any port = 443 flags S/SA keep state # ruleset/shop/0
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
block in quick from pool/10002 to any # deny/quarantine
block out quick proto tcp from any to pool/10002 port = 25 # deny/quarantine-out
block out quick proto udp from any to pool/10002 port = 53 # deny/quarantine-out
pass in quick proto tcp from pool/10003 to any port = 443 flags S/SA keep state # ruleset/shop/0
block in quick all # default
block out quick all # default
