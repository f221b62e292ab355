//! Folders and files that hold keys: readable by their owner only.
//!
//! The relay's data folder (the store with every rule's keys, the TLS keys, the root connection
//! string) and the manager's state folder (connection strings with keys) are created 0700, every
//! file in them 0600. A folder or file that group or others can reach is refused at start, and
//! the refusal says which `chmod` fixes it: the process would otherwise go on serving keys any
//! local user can read.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Mode of a private folder.
pub const DIR_MODE: u32 = 0o700;
/// Mode of a private file.
pub const FILE_MODE: u32 = 0o600;

/// Why a private folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PrivateError {
    /// Group or others can reach it; `fix` is the command that makes it private.
    #[error("{what} {path} can be read by other users (mode {mode:04o}); make it private with `{fix}` and start again")]
    Exposed {
        /// "folder" or "file".
        what: &'static str,
        /// The path.
        path: String,
        /// Its permission bits.
        mode: u32,
        /// The shell command that fixes it.
        fix: String,
    },
    /// The folder or a file could not be created or inspected.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PrivateError + '_ {
    move |source| PrivateError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Quotes `p` for a POSIX shell when it needs it.
fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@,".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Creates `dir` (and missing parents) with mode 0700, or checks that the existing one, and
/// every file directly in it, is out of reach of group and others.
pub fn ensure_dir(dir: &Path) -> Result<(), PrivateError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(io_err(dir))?;
        let mode = std::fs::metadata(dir)
            .map_err(io_err(dir))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(PrivateError::Exposed {
                what: "folder",
                path: dir.display().to_string(),
                mode,
                fix: format!("chmod 700 {}", shell_quote(dir)),
            });
        }
        let mut exposed = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let meta = e.metadata().map_err(io_err(&e.path()))?;
            let m = meta.permissions().mode() & 0o777;
            if meta.is_file() && m & 0o077 != 0 {
                exposed.push((e.path(), m));
            }
        }
        exposed.sort();
        if let Some((first, first_mode)) = exposed.first() {
            let list: Vec<String> = exposed.iter().map(|(p, _)| shell_quote(p)).collect();
            return Err(PrivateError::Exposed {
                what: "file",
                path: first.display().to_string(),
                mode: *first_mode,
                fix: format!("chmod 600 {}", list.join(" ")),
            });
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    Ok(())
}

/// Opens `path` for writing, created with mode 0600 when new (`truncate` empties an existing
/// one).
pub fn create_file(path: &Path, truncate: bool) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(truncate);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(FILE_MODE);
    }
    opts.open(path)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).map_or(0, |m| m.permissions().mode() & 0o777)
    }

    #[test]
    fn creates_private_and_refuses_exposed_with_the_fix() {
        let base = std::env::temp_dir().join(format!("hyco-private-{}", std::process::id()));
        let dir = base.join("a b/data");
        ensure_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let f = dir.join("store");
        drop(create_file(&f, false).unwrap());
        assert_eq!(mode(&f), 0o600);
        ensure_dir(&dir).unwrap();

        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ensure_dir(&dir).unwrap_err().to_string();
        let quoted = format!("'{}'", f.display());
        assert!(
            e.contains("mode 0644") && e.contains(&format!("`chmod 600 {quoted}`")),
            "{e}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        let e = ensure_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("folder") && e.contains("`chmod 700 '"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        ensure_dir(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&base);
    }
}
