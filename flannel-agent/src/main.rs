use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = flannel_agent::cli::Cli::parse();
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
    match rt.block_on(cli.execute()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flannel-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
