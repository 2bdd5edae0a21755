# ---- ippool.conf (ippool -f) ----
# Stockade ippool.conf: workload web-1 (slot a)
table role = ipf type = tree number = 10000
	{ 10.0.0.11/32; 10.0.0.12/31; };
table role = ipf type = tree number = 10001
	{ fd00::11/128; };

# ---- ipf.conf (ipf -I -f) ----
# Stockade ipf.conf: workload web-1, mode selective
pass in quick on lo0 all # failsafe:loopback
pass out quick on lo0 all # failsafe:loopback
block in quick from pool/10000 to any # deny/all-web
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
block in quick from pool/10001 to any # deny/all-web
pass in quick all keep state # default
pass out quick all keep state # default
