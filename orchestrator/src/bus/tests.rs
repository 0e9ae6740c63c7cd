//! Bus tests against a real nats-server.
