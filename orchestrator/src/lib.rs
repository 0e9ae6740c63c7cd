//! cairn's control plane. It owns every decision and never touches disk data.

pub mod api;
pub mod audit;
pub mod auth;
pub mod bus;
pub mod clock;
pub mod control;
pub mod engine;
pub mod error_code;
pub mod log;
pub mod notify;
pub mod policy;
pub mod views;
