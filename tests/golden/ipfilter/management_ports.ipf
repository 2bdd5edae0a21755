# ---- ippool.conf (ippool -f) ----
# Stockade ippool.conf: workload web-1 (slot a)
table role = ipf type = tree number = 10000
	{ 10.0.0.11/32; 10.0.0.12/31; };
table role = ipf type = tree number = 10001
	{ fd00::11/128; };

# ---- ipf.conf (ipf -I -f) ----
# Stockade ipf.conf: workload web-1, mode full
pass in quick on lo0 all # failsafe:loopback
pass out quick on lo0 all # failsafe:loopback
pass in quick proto tcp from any to any port = 22 flags S/SA keep state # failsafe:management
pass in quick proto tcp from any to any port 2221 >< 2224 flags S/SA keep state # failsafe:management
pass in quick proto udp from any to any port = 161 keep state # failsafe:management
pass in quick proto icmp from any to any icmp-type 8 keep state # failsafe:management
pass in quick proto tcp from pool/10000 to any port = 80 flags S/SA keep state # ruleset/shop/0
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
pass in quick proto tcp from any to any port 2221 >< 2224 flags S/SA keep state # failsafe:management
pass in quick proto udp from any to any port = 161 keep state # failsafe:management
pass in quick proto ipv6-icmp from any to any icmp-type 128 keep state # failsafe:management
pass in quick proto tcp from pool/10001 to any port = 80 flags S/SA keep state # ruleset/shop/0
block in quick all # default
block out quick all # default
