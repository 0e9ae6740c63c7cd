//! cairn's control plane. It owns every decision and never touches disk data.

pub mod log;
