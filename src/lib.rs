//! Facade of the Semel workspace: [`broker`], [`client`], [`producer`], [`consumer`], and
//! [`pipeline`] (consume-transform-produce with transactions).
#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub use semel_broker as broker;
pub use semel_client as client;
pub use semel_consumer as consumer;
pub use semel_producer as producer;

pub mod pipeline;
