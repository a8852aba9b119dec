//! A throwaway PostgreSQL server per test: `initdb` into a fresh temp dir owned by the
//! `postgres` OS user, `pg_ctl start` on 127.0.0.1 and a free TCP port (unix socket in
//! the temp dir), roles `watchdog` (owns database `watchdog`) and `readonly` (may connect,
//! may not create in schema public), both with password `secret`. Stopped and deleted on
//! drop. Every instance is independent: tests may run several in parallel.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::free_port;
use nix::unistd::{User, chown};

/// How long starting the server (and any wait for it to accept connections) may take.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times `start` picks a new port when the chosen one was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

/// A throwaway PostgreSQL server for one test: its own data dir in a temp dir, owned by
/// the postgres OS user, listening on 127.0.0.1 on a free TCP port (and its unix socket
/// in the temp dir, not /var/run), stopped and deleted on drop.
pub struct TestPostgres {
    /// `/usr/lib/postgresql/N/bin`.
    bin: PathBuf,
    /// The temp dir: holds `data/`, `server.log` and the unix socket.
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    /// fsync and synchronous commit on, as in production (for benchmarks); tests
    /// run without them for speed.
    durable: bool,
}

impl TestPostgres {
    /// initdb (as the postgres user), auth `scram-sha-256` for host connections and
    /// `trust` for local (unix socket) ones, start, then create role `watchdog` with
    /// password `secret` (LOGIN) and database `watchdog` owned by it, and a second role
    /// `readonly` with password `secret` that can connect to database `watchdog` but has
    /// no CREATE privilege on schema public. Returns once the server accepts connections
    /// (fails after 30 s, with the server log).
    pub fn start() -> Result<Self> {
        Self::start_with(false)
    }

    /// Like [`Self::start`], with fsync and synchronous commit on: figures measured
    /// against it mean what they would in production.
    pub fn start_durable() -> Result<Self> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Result<Self> {
        let bin = bin_dir()?;
        let user = User::from_name("postgres")
            .context("looking up the postgres OS user")?
            .ok_or_else(|| {
                anyhow!("no `postgres` OS user: is Debian's postgresql package installed?")
            })?;

        let dir = crate::scratch_dir("pg")?;
        // From here on, Drop cleans up whatever the remaining steps leave behind.
        let mut pg = TestPostgres {
            bin,
            data: dir.join("data"),
            log: dir.join("server.log"),
            dir,
            port: 0,
            durable,
        };
        chown(&pg.dir, Some(user.uid), Some(user.gid))
            .with_context(|| format!("chown {} to postgres", pg.dir.display()))?;
        std::fs::set_permissions(&pg.dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 700 {}", pg.dir.display()))?;

        let initdb = pg.bin.join("initdb");
        let mut cmd = pg.as_postgres(&initdb);
        cmd.arg("-D")
            .arg(&pg.data)
            .args([
                "-U",
                "postgres",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
            ])
            .args(["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]);
        run(&mut cmd)?;

        let mut attempt = 1;
        loop {
            pg.port = free_port()?;
            match pg.pg_ctl_start() {
                Ok(()) => break,
                // Another process took the port between our probe and the server's bind.
                Err(e) if attempt < PORT_ATTEMPTS && pg.log_tail(20).contains("already in use") => {
                    eprintln!("TestPostgres: port {} was taken, retrying: {e:#}", pg.port);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }

        pg.psql(
            "postgres",
            &[
                "create role watchdog login password 'secret'",
                "create database watchdog owner watchdog",
                "create role readonly login password 'secret'",
                "grant connect on database watchdog to readonly",
            ],
        )?;
        // PostgreSQL 15 already revokes CREATE on public from PUBLIC (the schema is owned
        // by pg_database_owner, i.e. watchdog); say it explicitly so readonly can never
        // create there, whatever the server version's defaults.
        pg.psql(
            "watchdog",
            &[
                "revoke create on schema public from public",
                "revoke all on schema public from readonly",
                "grant usage on schema public to readonly",
            ],
        )?;
        Ok(pg)
    }

    /// `postgres://watchdog:secret@127.0.0.1:PORT/watchdog`
    pub fn url(&self) -> String {
        self.url_as("watchdog", "secret")
    }

    /// Same with user/password given, e.g. `url_as("readonly", "secret")` or a wrong
    /// password. Both are percent-encoded.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/watchdog",
            percent_encode(user),
            percent_encode(password),
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir holding the data dir, the server log and the unix socket.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `pg_ctl stop -m fast`, waiting until the server has stopped. The data dir stays.
    pub fn stop(&self) -> Result<()> {
        let mut cmd = self.as_postgres(&self.bin.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-t", "30", "stop"]);
        run(&mut cmd).map_err(|e| self.with_log(e))?;
        Ok(())
    }

    /// `pg_ctl start` again on the same port and data dir; waits until the server accepts
    /// connections.
    pub fn restart(&self) -> Result<()> {
        self.pg_ctl_start()
    }

    /// Runs one SQL statement as the superuser through psql over the unix socket in the
    /// temp dir (`-X -A -t -q`, `ON_ERROR_STOP=1`, database `watchdog`) and returns its
    /// stdout, trimmed.
    pub fn query(&self, sql: &str) -> Result<String> {
        self.psql("watchdog", &[sql])
    }

    /// psql as the superuser over the unix socket, one `-c` per statement (each runs on
    /// its own, so CREATE DATABASE works).
    fn psql(&self, db: &str, statements: &[&str]) -> Result<String> {
        let mut cmd = self.as_postgres(&psql_bin(&self.bin));
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db]);
        for sql in statements {
            cmd.arg("-c").arg(sql);
        }
        let out = run(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `pg_ctl -w start` on `self.port`, then waits until the server answers on TCP.
    fn pg_ctl_start(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let speed = if self.durable {
            ""
        } else {
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        };
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1{speed} -c shared_buffers=16MB -c max_connections=50",
            self.port,
            shell_quote(&self.dir.to_string_lossy()),
        );
        let mut cmd = self.as_postgres(&self.bin.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .arg("-o")
            .arg(&options)
            .args(["-w", "-t", &START_TIMEOUT.as_secs().to_string(), "start"]);
        run(&mut cmd).map_err(|e| self.with_log(e))?;

        // pg_ctl -w already waited for "ready"; make sure TCP answers too.
        let isready = self.bin.join("pg_isready");
        loop {
            let mut cmd = self.as_postgres(&isready);
            cmd.args([
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-d",
                "postgres",
            ]);
            let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
            if status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "PostgreSQL on port {} does not accept connections after {:?} ({cmd:?}: {status})\n{}",
                    self.port,
                    START_TIMEOUT,
                    self.log_section()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// A command running `program` as the postgres OS user, in the temp dir, without any
    /// `PG*` variables of the caller's environment.
    fn as_postgres(&self, program: &Path) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(program)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log_section(&self) -> String {
        format!(
            "--- server log {} (tail) ---\n{}",
            self.log.display(),
            self.log_tail(40)
        )
    }

    fn with_log(&self, e: anyhow::Error) -> anyhow::Error {
        anyhow!("{e:#}\n{}", self.log_section())
    }

    /// The postmaster's pid, from `postmaster.pid`, if that file exists.
    fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines()
            .next()?
            .trim()
            .parse()
            .ok()
            .filter(|&pid| pid > 0)
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if self.postmaster_pid().is_some() {
            let mut cmd = self.as_postgres(&self.bin.join("pg_ctl"));
            cmd.arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "-t", "10", "stop"]);
            if let Err(e) = run(&mut cmd) {
                eprintln!("TestPostgres: stopping the server failed: {e:#}");
            }
            // Last resort, so no server outlives its test; only if that pid (the file may
            // be stale) still is this data dir's postmaster.
            if let Some(pid) = self.postmaster_pid()
                && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                    cmdline
                        .split(|&b| b == 0)
                        .any(|arg| arg == self.data.as_os_str().as_encoded_bytes())
                })
            {
                let pid = nix::unistd::Pid::from_raw(pid);
                if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                    eprintln!("TestPostgres: killed postmaster {pid}");
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("TestPostgres: removing {} failed: {e}", self.dir.display());
        }
    }
}

/// The server binaries: the highest `/usr/lib/postgresql/N/bin` that has `initdb`.
fn bin_dir() -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let bin = entry.path().join("bin");
            if bin.join("initdb").is_file() && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    best.map(|(_, bin)| bin).ok_or_else(|| {
        anyhow!(
            "PostgreSQL server binaries not found (no {}/*/bin/initdb): run `cargo xtask test` \
             (it installs Debian's postgresql package)",
            root.display()
        )
    })
}

/// psql of the server's version, else the one on PATH's usual place.
fn psql_bin(bin: &Path) -> PathBuf {
    let own = bin.join("psql");
    if own.is_file() {
        own
    } else {
        PathBuf::from("/usr/bin/psql")
    }
}

/// Runs `cmd`, capturing its output; an error unless it exits 0, with the command line,
/// its status, stderr and stdout.
fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            section("stderr", &out.stderr),
            section("stdout", &out.stdout)
        );
    }
    Ok(out)
}

fn section(name: &str, bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end();
    if text.is_empty() {
        String::new()
    } else {
        format!("--- {name} ---\n{text}\n")
    }
}

/// Single-quotes `s` for the shell that pg_ctl runs `postgres` through.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for a URL's userinfo.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
