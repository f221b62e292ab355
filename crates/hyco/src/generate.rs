//! `hyco completions SHELL` and `hyco man`: shell completions and manual pages generated from
//! the command-line definitions, so they cannot drift from the flags (the Debian package ships
//! both; packaging/build-deb).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};

#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    shell: clap_complete::Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// Write `hyco.1` and one page per subcommand (`hyco-relay.1`, `hyco-manager-run.1`, …)
    /// into this folder. Without it, print `hyco.1` to stdout.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Prints the completion script for `a.shell` to stdout.
pub fn completions<C: CommandFactory>(a: &CompletionsArgs) -> Result<()> {
    let mut cmd = C::command();
    let name = cmd.get_name().to_owned();
    // Into a buffer first: the generator panics on a write error (a closed pipe).
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, name, &mut buf);
    std::io::Write::write_all(&mut std::io::stdout(), &buf).context("cannot write the script")
}

/// Writes the manual pages (see [`ManArgs`]).
pub fn man<C: CommandFactory>(a: &ManArgs) -> Result<()> {
    let cmd = C::command();
    match &a.dir {
        Some(dir) => clap_mangen::generate_to(cmd, dir)
            .with_context(|| format!("cannot write the manual pages into {}", dir.display())),
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("cannot write the manual page"),
    }
}
