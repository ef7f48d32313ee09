//! Operations endpoints: /healthz and /readyz ([`health`]), /metrics
//! ([`metrics`]), on one small HTTP server ([`http`]).
pub mod health;
pub mod http;
pub mod metrics;
