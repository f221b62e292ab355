//! How the command line meets the environment and the terminal: empty variables, error chains.

use std::ffi::OsStr;

/// The value of a variable, with an empty one counted as unset (as shells and most tools do:
/// `HYCO_CA_FILE= hyco …` means "no CA file", not "a CA file with an empty name").
pub fn var(name: impl AsRef<OsStr>) -> Option<std::ffi::OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

/// `cmd` with every flag's `env` dropped whose variable is set but empty, in every subcommand,
/// so that parsing sees such a variable as unset: the one place where this holds for every
/// `HYCO_*` variable a flag reads.
pub fn empty_env_is_unset(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| match a.get_env() {
        Some(name) if std::env::var_os(name).is_some_and(|v| v.is_empty()) => a.env(None),
        _ => a,
    })
    .mut_subcommands(empty_env_is_unset)
}

/// Parses the command line (as `T::parse()` does: exits with the usage message on an error),
/// an empty variable counting as unset.
pub fn parse<T: clap::Parser>() -> T {
    let matches = empty_env_is_unset(T::command()).get_matches();
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// An error and its causes, `top: cause: cause`, each said once: a cause whose text the
/// message before it already ends with (an error that prints its source and also returns it
/// from `source()`, as `#[error("cannot reach {addr}: {source}")]` does) is left out.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !last.is_empty() && (last.ends_with(&text) || text.is_empty()) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        last = text;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Like `#[error("cannot reach {addr}: {source}")]` with a `source` field.
    #[derive(Debug)]
    struct Reach {
        addr: &'static str,
        source: std::io::Error,
    }
    impl std::fmt::Display for Reach {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot reach {}: {}", self.addr, self.source)
        }
    }
    impl std::error::Error for Reach {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let io_text = io.to_string();
        let e = anyhow::Error::new(Reach {
            addr: "localhost:9999",
            source: io,
        })
        .context("cannot reach the relay");
        assert_eq!(format!("{e:#}").matches(&io_text).count(), 2, "{e:#}");
        assert_eq!(
            error_chain(&e),
            format!("cannot reach the relay: cannot reach localhost:9999: {io_text}")
        );
        // Causes that merely look alike, but are not repeated at the end, all stay.
        let e = anyhow::anyhow!("refused")
            .context("connect")
            .context("refused twice");
        assert_eq!(error_chain(&e), "refused twice: connect: refused");
    }
}
