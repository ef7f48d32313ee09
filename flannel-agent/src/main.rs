use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = flannel_agent::cmd::cli::Cli::parse();
    cli.init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flannel-agent: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(flannel_agent::cmd::execute(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flannel-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
