//! DNS decisions for the sandbox's gateway resolver (pure; the transport is the data
//! path's).
//!
//! - [`pins`]: the per-sandbox pin set (name → addresses this sandbox resolved).

pub mod pins;

pub use pins::PinSet;
