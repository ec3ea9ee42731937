"""How events and state are kept: the event recorders (JetStream, in memory),
checkpoint artifacts, worker leases, the embedded NATS server and how the service
connects to it."""
