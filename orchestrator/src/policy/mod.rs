//! Protection policies as pure planners over the projections: the scheduler ([`schedule`]),
//! retention marks ([`retention`]), alerts ([`alerts`]), disk allocation review
//! ([`capacity`]), the data source state machine's reactions to job outcomes
//! ([`datasource`]) and the time zone schedules are written in ([`tz`]).
//!
//! Everything here takes `now` as a parameter and returns data; the engine service turns it
//! into commands and events.

pub mod alerts;
pub mod capacity;
pub mod datasource;
pub mod retention;
pub mod schedule;
pub mod tz;
