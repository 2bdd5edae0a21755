# ---- ippool.conf (ippool -f) ----
# Stockade ippool.conf: workload web-1 (slot a)
table role = ipf type = tree number = 10000
	{ 10.0.0.11/32; 10.0.0.12/31; };
table role = ipf type = tree number = 10001
	{ 10.0.0.0/8; 10.0.0.1/32; 172.16.0.0/12; };
table role = ipf type = tree number = 10002
	{ fd00::11/128; };
table role = ipf type = tree number = 10003
	{ fd00::/48; };

# ---- ipf.conf (ipf -I -f) ----
# Stockade ipf.conf: workload web-1, mode selective
pass in quick on lo0 all # failsafe:loopback
pass out quick on lo0 all # failsafe:loopback
pass in quick proto tcp from any to any port = 22 flags S/SA keep state # failsafe:management
pass in quick proto tcp from pool/10000 to any port = 22 flags S/SA keep state # ruleset/ops/0
pass in quick proto tcp from pool/10000 to any port = 3306 flags S/SA keep state # ruleset/ops/0
block in quick proto tcp from pool/10001 to any port = 3306 # deny/corp-db
block in quick proto udp from pool/10001 to any port = 3306 # deny/corp-db
block out quick from any to pool/10001 # deny/corp-out
pass in quick all keep state # default
pass out quick all keep state # default

# ---- ipf6.conf (ipf -6 -I -f) ----
# Stockade ipf6.conf: workload web-1, mode selective
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
pass in quick proto tcp from pool/10002 to any port = 22 flags S/SA keep state # ruleset/ops/0
pass in quick proto tcp from pool/10002 to any port = 3306 flags S/SA keep state # ruleset/ops/0
block in quick proto tcp from pool/10003 to any port = 3306 # deny/corp-db
block in quick proto udp from pool/10003 to any port = 3306 # deny/corp-db
block out quick from any to pool/10003 # deny/corp-out
pass in quick all keep state # default
pass out quick all keep state # default
