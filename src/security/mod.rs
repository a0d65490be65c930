//! Who may use sluice and where it may go: the egress guard (no private or metadata addresses
//! unless configured), proxy client identity (`clients:`), and credentials sluice injects so
//! application pods never hold the CRM secret. See SECURITY.md for the threat model.
//! [`secrets_equal`] is the one constant-time comparison of secrets.
//!
//! Low in the module graph (it reads only `config`, `error` and `kit`), so the rooms that enforce
//! it (`route`, `limit`, `upstream`, `listen`, `admin`) all read the same rules.

pub mod clients;
pub mod credentials;
pub mod egress;

use subtle::ConstantTimeEq;

/// SHA-256 of a secret: what sluice stores and compares instead of the secret itself.
pub fn digest(secret: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, secret).as_ref());
    out
}

/// Whether a presented secret equals the expected one, in a time that depends on neither their
/// contents nor their lengths: both are hashed to fixed-length digests, compared in constant time.
pub fn secrets_equal(presented: &[u8], expected: &[u8]) -> bool {
    digest(presented).ct_eq(&digest(expected)).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_content_whatever_their_length() {
        assert!(secrets_equal(b"s3cret", b"s3cret"));
        assert!(!secrets_equal(b"s3cret", b"s3cre"));
        assert!(!secrets_equal(b"", b"s3cret"));
        assert!(!secrets_equal(b"s3cret-and-more", b"s3cret"));
    }
}
