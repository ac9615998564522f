"""Proxy worker processes: the node proxy on every core.

With ``proxy_workers`` above 1 the agent process keeps the control plane (datapath, controller
stream, certificates, hand-over, admin, readiness, metrics) and runs the data plane
(`agent.dataplane.DataPlane`: 15001 and 15008) in that many worker processes, which share the
listening ports through SO_REUSEPORT, so the kernel spreads connections over them. Each
worker gets its inputs from the agent over a private socket pair (`wire`): the snapshot,
the workload certificates, accept/stop and drain; it answers with its share of the status.
Metrics go through prometheus_client's multiprocess files, merged at each scrape.
"""
