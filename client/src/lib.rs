//! semel-client: the connection layer shared by `semel-producer` and `semel-consumer`.
//!
//! Planned scope (issue 4): one connection per broker with framing, correlation ids, API-version
//! negotiation and request pipelining; bootstrap over several addresses; a metadata cache.
//! Nothing is implemented here yet; the crate exists so the workspace layout is fixed.
#![deny(missing_docs)]
