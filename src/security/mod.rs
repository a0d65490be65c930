//! Who may use sluice and where it may go: the egress guard (no private or metadata addresses
//! unless configured), proxy client identity (`clients:`), and credentials sluice injects so
//! application pods never hold the CRM secret. See SECURITY.md for the threat model.

pub mod clients;
pub mod credentials;
pub mod egress;
