//! Consumer processes for crash tests: the test binary re-executes itself with one test
//! (the "child") selected and a marker variable set, so a `kill -9` hits a real process and no
//! extra binary is needed. Children talk to the parent through files.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

/// How long a parent waits for a child before it calls the test failed.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// Runs `main` on a 2-thread runtime when `marker` is set (this process is the child);
/// otherwise does nothing (the child test run as part of the normal suite).
pub fn run_if_child<F>(marker: &str, main: impl FnOnce() -> F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    if std::env::var_os(marker).is_none() {
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(main())
}

/// A required environment variable of the child.
pub fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} not set"))
}

/// An optional comma-separated list of numbers (end offsets per partition).
pub fn env_list(name: &str) -> anyhow::Result<Option<Vec<i64>>> {
    std::env::var(name)
        .ok()
        .map(|s| {
            s.split(',')
                .map(|n| n.parse().map_err(anyhow::Error::from))
                .collect()
        })
        .transpose()
}

/// Appends one line to `path` (created if missing).
pub fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(file, "{line}")?;
    Ok(())
}

/// The lines of `path` (none when it does not exist yet).
pub fn lines(path: &Path) -> anyhow::Result<Vec<String>> {
    Ok(if path.exists() {
        std::fs::read_to_string(path)?
            .lines()
            .map(str::to_string)
            .collect()
    } else {
        Vec::new()
    })
}

/// A child process running test `name` of this binary with `marker` set; killed on drop.
pub struct ChildProcess(pub Child);

impl ChildProcess {
    pub fn spawn(name: &str, marker: &str, vars: &[(&str, String)]) -> anyhow::Result<Self> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(marker, "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in vars {
            command.env(k, v);
        }
        Ok(Self(
            command
                .spawn()
                .with_context(|| format!("cannot start child {name}"))?,
        ))
    }

    /// `kill -9`, and reaps it.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.0.kill()?;
        self.0.wait()?;
        Ok(())
    }

    /// Waits for the child to exit by itself.
    pub async fn wait_exit(&mut self) -> anyhow::Result<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            ensure!(started.elapsed() < PATIENCE, "the child never finished");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the child has written something to `status` (failing if it exits first).
    pub async fn wait_for_lines(&mut self, status: &Path) -> anyhow::Result<Vec<String>> {
        let started = Instant::now();
        loop {
            let found = lines(status)?;
            if !found.is_empty() {
                return Ok(found);
            }
            if let Some(exit) = self.0.try_wait()? {
                anyhow::bail!("the child exited early: {exit}");
            }
            ensure!(started.elapsed() < PATIENCE, "the child never reported");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A deterministic sequence of delays (what is asserted never depends on it).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_ms(&mut self, low: u64, high: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        low + (self.0 >> 33) % (high - low)
    }
}
