//! The broker binary on a fixed loopback port, so clients we did not write (which keep their
//! bootstrap address) find a restarted broker where they left it.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::{Context, bail};

use super::{ChildBroker, workspace_binary};

/// A free loopback port below the kernel's ephemeral range. While the broker is down, the
/// clients keep connecting to its port; a port inside the range could be handed out as the
/// local end of such a connection, which would then connect to itself.
pub fn free_port() -> anyhow::Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let low = 10_000u16;
    let span = u32::from(ephemeral_low.max(low + 1000) - low);
    let seed = std::process::id().wrapping_add(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos(),
    );
    for i in 0..2000u32 {
        let port = low + u16::try_from(seed.wrapping_add(i.wrapping_mul(7919)) % span)?;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found between {low} and {ephemeral_low}")
}

/// The broker binary listening on `127.0.0.1:port` ([`ChildBroker::spawn`] always asks for
/// port 0, but a restarted broker must come back where the Java clients look for it).
pub fn spawn_broker_on(
    data_dir: &Path,
    port: u16,
    extra_args: &[&str],
) -> anyhow::Result<ChildBroker> {
    spawn_broker_with_env(data_dir, port, extra_args, &[])
}

/// [`spawn_broker_on`] with extra environment variables for the broker.
pub fn spawn_broker_with_env(
    data_dir: &Path,
    port: u16,
    extra_args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<ChildBroker> {
    let binary = workspace_binary("semel-broker")?;
    let mut child = Command::new(&binary)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data_dir)
        .args(["--log-level", "info"])
        .args(extra_args)
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let output = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&output);
    let (listening, addr) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("semel-broker listening on ") {
                let _ = listening.send(addr.trim().to_string());
            }
            sink.lock().expect("output lock").push(line);
        }
    });
    let addr = match addr.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => addr.parse()?,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "broker on port {port} never said it was listening; output:\n{}",
                output.lock().expect("output lock").join("\n")
            );
        }
    };
    Ok(ChildBroker {
        child,
        addr,
        output,
    })
}

/// A broker on a free port (another free port if that one was taken meanwhile).
pub fn spawn_broker_on_free_port(
    data_dir: &Path,
    extra_args: &[&str],
) -> anyhow::Result<(ChildBroker, u16)> {
    let mut last = None;
    for _ in 0..3 {
        let port = free_port()?;
        match spawn_broker_on(data_dir, port, extra_args) {
            Ok(broker) => return Ok((broker, port)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.context("no attempt")?)
}
