# ---- ippool.conf (ippool -f) ----
# Stockade ippool.conf: workload web-1 (slot a)
table role = ipf type = tree number = 10000
	{ 10.0.1.20/32; };
table role = ipf type = tree number = 10001
	{ fd00:1::20/128; };

# ---- ipf.conf (ipf -I -f) ----
# Stockade ipf.conf: workload web-1, mode full
pass in quick on lo0 all # failsafe:loopback
pass out quick on lo0 all # failsafe:loopback
pass in quick proto tcp from any to any port = 22 flags S/SA keep state # failsafe:management
pass out quick proto tcp from any to 10.9.0.1/32 port = 9443 flags S/SA keep state # failsafe:controller
pass out quick proto tcp from any to 10.9.0.2/31 port = 9443 flags S/SA keep state # failsafe:controller
pass out quick proto tcp from any to 10.10.0.0/16 port = 9443 flags S/SA keep state # failsafe:controller
pass out quick proto tcp from any to pool/10000 port = 5432 flags S/SA keep state # ruleset/shop/1
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
pass out quick proto tcp from any to fd00:ff::1/128 port = 9443 flags S/SA keep state # failsafe:controller
pass out quick proto tcp from any to pool/10001 port = 5432 flags S/SA keep state # ruleset/shop/1
block in quick all # default
block out quick all # default
