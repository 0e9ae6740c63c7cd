//! Helpers shared by the end-to-end tests: locating the binary, building images, polling.
