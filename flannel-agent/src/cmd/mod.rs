//! Command entry points: `run` (the agent), `show`, `uninstall`, and the
//! command line that picks one.
pub mod cli;
pub mod run;
pub mod run6;
pub mod show;
pub mod uninstall;

use cli::{Cli, Command};

/// Run the command the command line names.
pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run::run(*args).await,
        Command::Show(a) => {
            print!("{}", show::render(&a.pins.pin_root, a.view, a.json)?);
            Ok(())
        }
        Command::Uninstall(p) => uninstall::uninstall(&p.pin_root).await,
    }
}
