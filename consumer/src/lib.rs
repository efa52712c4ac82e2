//! semel-consumer: a consumer-group library with dedup middleware.
//!
//! Planned scope (issues 6, 7, 8). Nothing is implemented here yet; the crate exists so the
//! workspace layout is fixed.
#![deny(missing_docs)]
