//! The `itemcache` command: `serve` (the default), `migrate`, `seed --count N`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use itemcache::app::Application;
use itemcache::config::Settings;
use itemcache::{db, seed, telemetry};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Item lookups over REST: Redis in front of Postgres, race-safe, observable.
///
/// Configured by environment variables (and a `.env` file in the working directory);
/// see the README for the list.
#[derive(Parser)]
#[command(name = "itemcache", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending migrations, then serve HTTP until SIGINT or SIGTERM (the default).
    Serve,
    /// Apply pending migrations and exit.
    Migrate,
    /// Insert N synthetic items in bulk, showing progress.
    Seed {
        /// How many items to insert.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        count: u64,
    },
}

/// Configuration errors exit 2, as the contract says; everything else 1.
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!(".env: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(settings.log_format, &settings.log_filter);
    let outcome = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings).await,
        Command::Migrate => db::run_migrations(&settings.database_url)
            .await
            .map(|applied| tracing::info!(applied, "migrations applied"))
            .map_err(|e| e.to_string()),
        Command::Seed { count } => match db::run_migrations(&settings.database_url).await {
            Err(e) => Err(e.to_string()),
            Ok(_) => seed::seed(&settings.database_url, count)
                .await
                .map(|took| eprintln!("seeded {count} items in {:.1} s", took.as_secs_f64()))
                .map_err(|e| e.to_string()),
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> Result<(), String> {
    let listen = settings.listen_addr;
    let app = Application::build(settings)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(%listen, port = app.port(), "itemcache listening");
    app.run_until_stopped(shutdown_signal())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
