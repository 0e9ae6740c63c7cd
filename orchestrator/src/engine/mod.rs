//! The job engine: projections ([`state`]), command decisions ([`decide`]), the job reconciler
//! ([`jobs`]), and the service that runs them over an event log ([`service`]).
//!
//! Everything but `service` is pure: state in, events out. `service` is the only place that
//! appends to the log, talks to the step bus and reads the clock.

pub mod decide;
pub mod jobs;
pub mod ownership;
pub mod ports;
pub mod protect;
pub mod read;
pub mod read_policy;
pub mod recovery;
pub mod service;
pub mod snapshot;
pub mod softdelete;
pub mod state;
pub mod tokens;

#[cfg(test)]
mod tests;
