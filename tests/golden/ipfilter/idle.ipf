# ---- ippool.conf (ippool -f) ----
# Stockade ippool.conf: workload web-1 (slot a)

# ---- ipf.conf (ipf -I -f) ----
# Stockade ipf.conf: workload web-1, mode idle

# ---- ipf6.conf (ipf -6 -I -f) ----
# Stockade ipf6.conf: workload web-1, mode idle
