use clap::Parser;

fn main() -> std::process::ExitCode {
    qgenome::tune_malloc();
    qgenome::cli::init_tracing();
    let cli = qgenome::cli::Cli::parse();
    match cli.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qgenome: {}", qgenome::error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
