//! Secrets that never enter the VM: the guest holds a placeholder, the host substitutes
//! the real value on the way out — only toward the hosts the secret is meant for.
//!
//! - [`config`]: the validated secret set ([`SecretSet::from_wire`]) — values are held in
//!   [`SecretValue`], which is zeroed on drop and redacted in every format.
//! - [`scan`]: the streaming placeholder search (literal, `%24`, `\u0024`, `\x24`, split
//!   anywhere) and literal replacement.
//! - [`stream`]: the per-connection engine ([`Substituter`]) over the decrypted
//!   guest→upstream byte stream of one HTTP/1.x connection.
//!
//! Pure code: no sockets, no clocks. The data path terminates TLS (see [`crate::tls`]),
//! feeds the decrypted bytes to a [`Substituter`] and writes what it returns upstream; on
//! a [`Refusal`] it cuts both sides and logs by env name (see DESIGN.md "Secrets").

pub mod config;
pub mod scan;
pub mod stream;

#[doc(hidden)]
pub mod fuzzing;

pub use config::{
    HostPattern, Injection, Secret, SecretConfigError, SecretSet, SecretValue, ViolationAction,
};
pub use stream::{ConnIdentity, Part, Refusal, Substituter, Violation};

#[cfg(test)]
mod tests;
