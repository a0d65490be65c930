//! Rotated refresh tokens: which refresh token to send, and where a new one is kept.
//!
//! A token endpoint that rotates refresh tokens (Salesforce with rotation on, most IdPs) answers
//! a refresh with a new one, and the one just used may stop working. The new token is written
//! back to `refresh_token_file` when sluice can write it (a plain file; a Kubernetes Secret
//! mount is read-only), and kept either way in memory and, with the Redis store, in Redis, where
//! every replica finds it.
//!
//! The file and the kept token can disagree for two reasons: the file is one sluice has moved
//! past (a Secret mount still holding the first token, or a replica's own older write-back), or
//! the operator put a brand-new token there (the app was authorised again). The kept record
//! says which: it holds the hashes of every refresh token its chain has used. A file whose token
//! is in that list is stale, and the kept token wins; any other file is news, and wins.

use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// How many used tokens a record remembers.
const MAX_SEEN: usize = 32;

/// The newest refresh token of a chain, and the hashes of the ones it replaced.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotated {
    #[serde(rename = "v")]
    pub value: String,
    #[serde(rename = "seen", default)]
    pub seen: Vec<String>,
}

impl std::fmt::Debug for Rotated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotated").field("seen", &self.seen.len()).finish_non_exhaustive()
    }
}

/// The refresh token to send: the kept one while the file holds a token its chain used (or the
/// same one), the file's otherwise.
pub fn choose<'a>(file: &'a str, kept: Option<&'a Rotated>) -> &'a str {
    match kept {
        Some(kept) if kept.value == file || kept.seen.contains(&fingerprint(file)) => &kept.value,
        _ => file,
    }
}

/// The record after `used` was answered with `fresh`.
pub fn rotate(kept: Option<&Rotated>, used: &str, fresh: &str) -> Rotated {
    let mut seen = kept.filter(|kept| kept.value == used).map(|kept| kept.seen.clone()).unwrap_or_default();
    let used = fingerprint(used);
    if !seen.contains(&used) {
        seen.push(used);
    }
    if seen.len() > MAX_SEEN {
        seen.drain(..seen.len() - MAX_SEEN);
    }
    Rotated { value: fresh.to_owned(), seen }
}

/// A refresh token's SHA-256, hex: what a record keeps of the tokens it replaced.
pub fn fingerprint(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `token` to `path` the way a Secret update lands: a private temporary file beside it,
/// renamed over it. Blocking; fails on a read-only mount, which is expected.
pub fn write_back(path: &Path, token: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.sluice-{:08x}", rand::random::<u32>()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(token.as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_file_loses_to_the_chain_and_a_new_one_wins() {
        // No record: the file.
        assert_eq!(choose("rt-1", None), "rt-1");
        let first = rotate(None, "rt-1", "rt-2");
        assert_eq!(choose("rt-1", Some(&first)), "rt-2", "a read-only mount still holding rt-1");
        assert_eq!(choose("rt-2", Some(&first)), "rt-2", "written back");
        let second = rotate(Some(&first), "rt-2", "rt-3");
        assert_eq!(second.seen, [fingerprint("rt-1"), fingerprint("rt-2")]);
        assert_eq!(choose("rt-2", Some(&second)), "rt-3", "a replica's own older write-back");
        assert_eq!(choose("rt-1", Some(&second)), "rt-3");
        assert_eq!(choose("rt-new", Some(&second)), "rt-new", "the operator authorised the app again");
        let restarted = rotate(Some(&second), "rt-new", "rt-new-2");
        assert_eq!(restarted.seen, [fingerprint("rt-new")], "a new chain starts");
    }

    #[test]
    fn records_are_bounded() {
        let mut record = rotate(None, "rt-0", "rt-1");
        for at in 1..100 {
            record = rotate(Some(&record), &format!("rt-{at}"), &format!("rt-{}", at + 1));
        }
        assert_eq!(record.seen.len(), MAX_SEEN);
        assert_eq!(record.value, "rt-100");
        assert_eq!(choose("rt-99", Some(&record)), "rt-100");
    }

    #[test]
    fn write_back_replaces_the_file_privately() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refresh-token");
        std::fs::write(&path, "rt-1\n").unwrap();
        write_back(&path, "rt-2").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "rt-2\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        assert!(write_back(&dir.path().join("missing-dir/refresh-token"), "rt").is_err());
    }
}
