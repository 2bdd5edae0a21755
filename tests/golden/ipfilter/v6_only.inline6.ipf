# ---- ippool.conf (ippool -f) ----
# Stockade ippool.conf: workload web-1 (slot a)
# pool 10000 (pv6000000006 v4) is empty: created by ippool -A

# ---- ipf.conf (ipf -I -f) ----
# Stockade ipf.conf: workload web-1, mode full
pass in quick on lo0 all # failsafe:loopback
pass out quick on lo0 all # failsafe:loopback
pass in quick proto tcp from any to any port = 22 flags S/SA keep state # failsafe:management
pass in quick proto tcp from pool/10000 to any port = 80 flags S/SA keep state # ruleset/v6/0
pass out quick proto udp from any to pool/10000 port = 53 keep state # ruleset/v6/1
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
pass out quick proto tcp from any to fd00:ff::1/128 port = 8443 flags S/SA keep state # failsafe:controller
pass in quick proto tcp from fd00:2::1/128 to any port = 80 flags S/SA keep state # ruleset/v6/0
pass in quick proto ipv6-icmp from fd00:2::1/128 to any icmp-type 128 keep state # ruleset/v6/0
pass in quick proto tcp from fd00:2::2/128 to any port = 80 flags S/SA keep state # ruleset/v6/0
pass in quick proto ipv6-icmp from fd00:2::2/128 to any icmp-type 128 keep state # ruleset/v6/0
pass in quick proto tcp from fd00:3::/64 to any port = 80 flags S/SA keep state # ruleset/v6/0
pass in quick proto ipv6-icmp from fd00:3::/64 to any icmp-type 128 keep state # ruleset/v6/0
pass out quick proto udp from any to fd00:2::1/128 port = 53 keep state # ruleset/v6/1
pass out quick proto udp from any to fd00:2::2/128 port = 53 keep state # ruleset/v6/1
pass out quick proto udp from any to fd00:3::/64 port = 53 keep state # ruleset/v6/1
block in quick all # default
block out quick all # default
