//! Who may watch and kill what (issue 11): a real daemon, real non-root users made by
//! the test (useradd, removed at the end, also on failure), their CLI calls and
//! processes run as them (setpriv), and the daemon's answers checked line by line.
//!
//! Each test has its own socket group (passed as --socket-group) and users, named
//! `wdt-<test pid>-<tag>...`, so tests running side by side share no state.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};
use watchdog_tests::{
    Accounts, Daemon, User, Workload, alive, all_nodes, await_state, children_by_scan, free_port,
    one_line_error, sqlite_query,
};

/// A daemon whose socket is for `group`'s members, with `admin` as its admin group,
/// in a directory the test users can reach.
fn daemon(group: &str, admin: Option<&str>) -> Result<Daemon> {
    let mut builder = Daemon::builder().arg("--socket-group", group);
    if let Some(admin) = admin {
        builder = builder.arg("--admin-group", admin);
    }
    let daemon = builder.start()?;
    std::fs::set_permissions(&daemon.dir, std::fs::Permissions::from_mode(0o755))?;
    let socket = std::fs::metadata(&daemon.socket)?;
    let gid = nix::unistd::Group::from_name(group)?
        .context("the group")?
        .gid
        .as_raw();
    assert_eq!(
        (socket.mode() & 0o777, socket.uid(), socket.gid()),
        (0o660, 0, gid),
        "the socket is root:{group} 0660"
    );
    Ok(daemon)
}

/// The analyses of dump-tree: (id, owner uid, processes).
fn analyses(daemon: &Daemon) -> Result<Vec<(String, u32, usize)>> {
    let out = daemon.request(r#"{"op":"dump_tree"}"#)?;
    let analyses = out["ok"]["analyses"]
        .as_array()
        .context("analyses in the reply")?;
    let mut found: Vec<(String, u32, usize)> = analyses
        .iter()
        .map(|a| {
            (
                a["analysis_id"].as_str().unwrap_or_default().to_string(),
                a["owner_uid"].as_u64().unwrap_or(u64::MAX) as u32,
                a["processes"].as_u64().unwrap_or(0) as usize,
            )
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Pids of `workload`'s process and its descendants, once it has `count` of them.
fn tree_of(workload: &Workload, count: usize) -> Result<Vec<u32>> {
    await_state("the workload's processes", || {
        let mut pids = vec![workload.pid()];
        let mut i = 0;
        while i < pids.len() {
            let children =
                std::fs::read_to_string(format!("/proc/{}/task/{}/children", pids[i], pids[i]))
                    .unwrap_or_default();
            if children.is_empty() {
                // No CONFIG_PROC_CHILDREN: scan for the parent.
                pids.extend(children_by_scan(pids[i]));
            } else {
                pids.extend(
                    children
                        .split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
            i += 1;
        }
        Ok((pids.len() >= count).then_some(pids))
    })
}

/// The real uid of a process, from /proc.
fn real_uid(pid: u32) -> Option<u32> {
    watchdog_tests::real_uid_in(std::path::Path::new("/proc"), pid)
}

/// A shell running as `user` with one child (`sleep`): a tree of two.
fn two_of(user: &User) -> Result<(Workload, Vec<u32>)> {
    let workload = user.spawn(&["sh", "-c", "sleep 600 & wait"])?;
    let pids = tree_of(&workload, 2)?;
    for &pid in &pids {
        assert_eq!(
            real_uid(pid),
            Some(user.uid),
            "pid {pid} runs as {}",
            user.name
        );
    }
    Ok((workload, pids))
}

#[test]
fn a_member_watches_their_own_processes_and_unregisters_their_own_analyses() -> Result<()> {
    let mut accounts = Accounts::new("m");
    let group = accounts.group("sock")?;
    let alice = accounts.user("a", &[&group])?;
    let daemon = daemon(&group, None)?;

    // exec: started already watched, killed at its timeout; the record names her.
    let out = alice.cli(
        &daemon,
        &[
            "exec",
            "--analysis-id",
            "alice-exec",
            "--timeout",
            "1s",
            "--grace",
            "1s",
            "--",
            "sleep",
            "600",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(128 + 15),
        "exec as {}: {}",
        alice.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let events = await_state("the timeout's record", || {
        let events = daemon.events()?;
        Ok((!events.is_empty()).then_some(events))
    })?;
    assert_eq!(events[0].record.analysis_id, "alice-exec");
    assert_eq!(events[0].record.uid, alice.uid);
    assert_eq!(events[0].record.owner_uid, Some(alice.uid));

    // register: her tree of two, both watched, both hers in dump-tree.
    let (mut tree, pids) = two_of(&alice)?;
    let said = alice.cli_ok(
        &daemon,
        &[
            "register",
            "--pid",
            &pids[0].to_string(),
            "--analysis-id",
            "alice-a",
        ],
    )?;
    assert!(said.contains("2 processes watched"), "{said}");
    let nodes = daemon.tree(Some("alice-a"))?;
    let flat = all_nodes(&nodes);
    assert_eq!(flat.len(), 2);
    assert!(flat.iter().all(|n| n.owner_uid == alice.uid));
    assert_eq!(analyses(&daemon)?, vec![("alice-a".into(), alice.uid, 2)]);
    let text = alice.cli_ok(&daemon, &["dump-tree"])?;
    assert!(
        text.contains(&format!(
            "analysis alice-a (owner uid {} ({}))",
            alice.uid, alice.name
        )),
        "{text}"
    );
    assert!(text.contains(&format!("owner={}", alice.uid)), "{text}");
    // The process table names her too.
    let db = daemon.state_dir().join("watchdog.db");
    await_state("watchdog_processes rows with her uid", || {
        let rows = sqlite_query(
            &db,
            "SELECT pid, owner_uid FROM watchdog_processes WHERE analysis_id = 'alice-a' ORDER BY pid",
        )?;
        let want: Vec<String> = {
            let mut p = pids.clone();
            p.sort();
            p.iter().map(|p| format!("{p}|{}", alice.uid)).collect()
        };
        Ok((rows == want.join("\n")).then_some(()))
    })?;
    let stored = sqlite_query(
        &db,
        "SELECT owner_uid FROM watchdog_events WHERE analysis_id = 'alice-exec'",
    )?;
    assert_eq!(stored, alice.uid.to_string());

    // unregister: her child by pid, then her analysis.
    let said = alice.cli_ok(&daemon, &["unregister", "--pid", &pids[1].to_string()])?;
    assert!(said.contains("unregistered 1 processes"), "{said}");
    let said = alice.cli_ok(&daemon, &["unregister", "--analysis-id", "alice-a"])?;
    assert!(said.contains("unregistered 1 processes"), "{said}");
    assert!(analyses(&daemon)?.is_empty());
    assert!(
        tree.alive_now() && pids.iter().all(|&p| alive(p)),
        "unwatched, not killed"
    );
    Ok(())
}

#[test]
fn what_is_not_yours_is_refused_in_one_line_and_stays_as_it_was() -> Result<()> {
    let mut accounts = Accounts::new("r");
    let group = accounts.group("sock")?;
    let alice = accounts.user("a", &[&group])?;
    let bob = accounts.user("b", &[&group])?;
    let daemon = daemon(&group, None)?;

    // Bob's analysis, and alice's own process.
    let (mut bobs, bob_pids) = two_of(&bob)?;
    bob.cli_ok(
        &daemon,
        &[
            "register",
            "--pid",
            &bob_pids[0].to_string(),
            "--analysis-id",
            "bob-b",
        ],
    )?;
    let (mut hers, her_pids) = two_of(&alice)?;
    let mut roots = Workload::spawn("sleep", &["600"])?;
    let untouched = |daemon: &Daemon| -> Result<()> {
        assert_eq!(analyses(daemon)?, vec![("bob-b".into(), bob.uid, 2)]);
        assert!(bob_pids.iter().all(|&p| alive(p)), "bob's processes live");
        Ok(())
    };

    let bobs_root = bob_pids[0].to_string();
    let line = alice.refused(
        &daemon,
        &["register", "--pid", &bobs_root, "--analysis-id", "mine"],
        "own-processes",
    );
    assert!(
        line.contains(&format!(
            "runs as uid {}, and you are uid {}",
            bob.uid, alice.uid
        )),
        "{line}"
    );
    untouched(&daemon)?;
    alice.refused(
        &daemon,
        &[
            "register",
            "--pid",
            &roots.pid().to_string(),
            "--analysis-id",
            "mine",
        ],
        "own-processes",
    );
    alice.refused(
        &daemon,
        &["exec", "--analysis-id", "bob-b", "--", "true"],
        "own-analyses",
    );
    let line = alice.refused(
        &daemon,
        &[
            "register",
            "--pid",
            &her_pids[0].to_string(),
            "--analysis-id",
            "bob-b",
        ],
        "own-analyses",
    );
    assert!(
        line.contains("analysis \"bob-b\" was created by uid"),
        "{line}"
    );
    untouched(&daemon)?;
    alice.refused(
        &daemon,
        &["unregister", "--analysis-id", "bob-b"],
        "own-analyses",
    );
    alice.refused(
        &daemon,
        &["unregister", "--pid", &bob_pids[1].to_string()],
        "own-processes",
    );
    untouched(&daemon)?;
    assert!(analyses(&daemon)?.iter().all(|(id, ..)| id != "mine"));

    // Her process whose child runs as root (a shell that forked `sleep` as root, then
    // became her): refused whole, nothing of it watched.
    let mixed_cmd = format!(
        "sleep 600 & exec setpriv --reuid {0} --regid {0} --init-groups -- sleep 601",
        alice.name
    );
    let mixed = Workload::spawn("sh", &["-c", &mixed_cmd])?;
    let mixed_pids = tree_of(&mixed, 2)?;
    await_state("the shell to become her sleep", || {
        Ok((real_uid(mixed_pids[0]) == Some(alice.uid)).then_some(()))
    })?;
    assert_eq!(real_uid(mixed_pids[1]), Some(0));
    let watched_before = daemon.status()?.monitored_count;
    let line = alice.refused(
        &daemon,
        &[
            "register",
            "--pid",
            &mixed_pids[0].to_string(),
            "--analysis-id",
            "mixed",
        ],
        "own-processes",
    );
    assert!(
        line.contains(&format!(
            "pid {}, a descendant of pid {}",
            mixed_pids[1], mixed_pids[0]
        )) || line.contains(&format!("a descendant of pid {}", mixed_pids[0])),
        "{line}"
    );
    assert_eq!(daemon.status()?.monitored_count, watched_before);
    assert!(daemon.tree(Some("mixed"))?.is_empty());
    untouched(&daemon)?;

    assert!(bobs.alive_now() && hers.alive_now() && roots.alive_now());
    drop(mixed);
    Ok(())
}

#[test]
fn a_user_outside_the_socket_group_cannot_connect() -> Result<()> {
    let mut accounts = Accounts::new("o");
    let group = accounts.group("sock")?;
    let carol = accounts.user("c", &[])?;
    let daemon = daemon(&group, None)?;
    for args in [
        &["status"][..],
        &["dump-tree"],
        &["register", "--pid", "1", "--analysis-id", "x"],
    ] {
        let line = one_line_error(&carol.cli(&daemon, args));
        eprintln!("{} {args:?}: {line}", carol.name);
        assert!(
            line.contains(&format!(
                "permission denied on the watchdog socket {}",
                daemon.socket.display()
            )) && line.contains(&format!("members of group \"{group}\"")),
            "{line}"
        );
    }
    // Reads are open to whoever can connect.
    let reader = accounts.user("r", &[&group])?;
    reader.cli_ok(&daemon, &["status"])?;
    reader.cli_ok(&daemon, &["events"])?;
    reader.cli_ok(&daemon, &["dump-tree"])?;
    Ok(())
}

#[test]
fn root_and_the_admin_group_may_do_everything() -> Result<()> {
    let mut accounts = Accounts::new("x");
    let group = accounts.group("sock")?;
    let admins = accounts.group("adm")?;
    let alice = accounts.user("a", &[&group])?;
    let bob = accounts.user("b", &[&group])?;
    let admin = accounts.user("d", &[&group, &admins])?;
    let daemon = daemon(&group, Some(&admins))?;

    let (mut hers, her_pids) = two_of(&alice)?;
    let (mut his, his_pids) = two_of(&bob)?;
    let mut roots = Workload::spawn("sleep", &["600"])?;
    // Root registers her tree (root owns that analysis), and joins bob's tree to it.
    daemon.register(her_pids[0], "root-r")?;
    daemon.register(his_pids[0], "root-r")?;
    assert_eq!(analyses(&daemon)?, vec![("root-r".into(), 0, 4)]);
    // Neither may unregister what root made, though one process is her own.
    alice.refused(
        &daemon,
        &["unregister", "--analysis-id", "root-r"],
        "own-analyses",
    );
    alice.refused(
        &daemon,
        &["unregister", "--pid", &her_pids[1].to_string()],
        "own-analyses",
    );
    // The admin registers root's process into alice's analysis and takes it out again,
    // and unregisters root's analysis; root unregisters alice's.
    let (mut mine, my_pids) = two_of(&alice)?;
    alice.cli_ok(
        &daemon,
        &[
            "register",
            "--pid",
            &my_pids[0].to_string(),
            "--analysis-id",
            "alice-a",
        ],
    )?;
    admin.cli_ok(
        &daemon,
        &[
            "register",
            "--pid",
            &roots.pid().to_string(),
            "--analysis-id",
            "alice-a",
        ],
    )?;
    assert!(analyses(&daemon)?.contains(&("alice-a".into(), alice.uid, 3)));
    admin.cli_ok(&daemon, &["unregister", "--pid", &roots.pid().to_string()])?;
    admin.cli_ok(&daemon, &["unregister", "--analysis-id", "root-r"])?;
    daemon.cli_ok(&["unregister", "--analysis-id", "alice-a"])?;
    assert!(analyses(&daemon)?.is_empty());
    std::thread::sleep(Duration::from_millis(100));
    assert!(hers.alive_now() && his.alive_now() && roots.alive_now() && mine.alive_now());
    Ok(())
}

#[test]
fn without_its_group_the_socket_stays_root_only_and_the_daemon_says_so_once() -> Result<()> {
    let mut accounts = Accounts::new("n");
    let missing = format!("{}-missing", accounts.prefix);
    let other = accounts.group("sock")?;
    let dave = accounts.user("d", &[&other])?;
    let daemon = Daemon::builder().arg("--socket-group", &missing).start()?;
    std::fs::set_permissions(&daemon.dir, std::fs::Permissions::from_mode(0o755))?;
    let socket = std::fs::metadata(&daemon.socket)?;
    assert_eq!(
        (socket.mode() & 0o777, socket.uid(), socket.gid()),
        (0o660, 0, 0),
        "root-only"
    );
    let log = daemon.log();
    let said: Vec<&str> = log.lines().filter(|l| l.contains(&missing)).collect();
    assert_eq!(said.len(), 1, "one line:\n{log}");
    assert!(
        said[0].contains("does not exist")
            && said[0].contains(&format!("groupadd --system {missing}")),
        "{}",
        said[0]
    );
    eprintln!("daemon: {}", said[0]);
    let line = one_line_error(&dave.cli(&daemon, &["status"]));
    eprintln!("{}: {line}", dave.name);
    assert!(line.contains("it is root-only"), "{line}");
    daemon.cli_ok(&["status"])?;
    Ok(())
}

#[test]
fn owners_survive_a_daemon_restart() -> Result<()> {
    let mut accounts = Accounts::new("s");
    let group = accounts.group("sock")?;
    let alice = accounts.user("a", &[&group])?;
    let bob = accounts.user("b", &[&group])?;
    let mut daemon = daemon(&group, None)?;
    let (mut hers, her_pids) = two_of(&alice)?;
    alice.cli_ok(
        &daemon,
        &[
            "register",
            "--pid",
            &her_pids[0].to_string(),
            "--analysis-id",
            "alice-a",
        ],
    )?;
    daemon.restart()?;
    // Read back from the pinned analysis by the new daemon.
    assert_eq!(analyses(&daemon)?, vec![("alice-a".into(), alice.uid, 2)]);
    let (_his, his_pids) = two_of(&bob)?;
    bob.refused(
        &daemon,
        &[
            "register",
            "--pid",
            &his_pids[0].to_string(),
            "--analysis-id",
            "alice-a",
        ],
        "own-analyses",
    );
    bob.refused(
        &daemon,
        &["unregister", "--analysis-id", "alice-a"],
        "own-analyses",
    );
    alice.cli_ok(&daemon, &["unregister", "--analysis-id", "alice-a"])?;
    assert!(analyses(&daemon)?.is_empty() && hers.alive_now());
    Ok(())
}

#[test]
fn the_socket_appears_only_with_its_final_mode_and_group() -> Result<()> {
    let mut accounts = Accounts::new("stage");
    let group = accounts.group("sock")?;
    // Looks at the socket the moment it exists, while the daemon starts.
    let watcher = r#"sock="$3"
(while [ ! -S "$sock" ]; do :; done; stat -c '%a %U %G' "$sock" > "$sock.first") &
exec "$@""#;
    let daemon = Daemon::builder()
        .arg("--socket-group", &group)
        .wrapper(&["sh", "-c", watcher, "sh"])
        .start()?;
    let seen = format!("{}.first", daemon.socket.display());
    let first = await_state("the first look at the socket", || {
        Ok(std::fs::read_to_string(&seen)
            .ok()
            .filter(|s| s.ends_with('\n')))
    })?;
    assert_eq!(
        first.trim(),
        format!("660 root {group}"),
        "the first a client could see"
    );
    Ok(())
}

#[test]
fn a_member_is_refused_at_the_quota_and_roots_analysis_survives_a_restart() -> Result<()> {
    let mut accounts = Accounts::new("quota");
    let group = accounts.group("sock")?;
    let member = accounts.user("m", &[&group])?;
    let mut daemon = {
        let daemon = Daemon::builder()
            .arg("--socket-group", &group)
            .arg("--user-max-analyses", "50")
            .start()?;
        std::fs::set_permissions(&daemon.dir, std::fs::Permissions::from_mode(0o755))?;
        daemon
    };
    let mut sleeper = member.spawn(&[
        "sh",
        "-c",
        "for i in $(seq 60); do sleep 600 & done; echo started; wait",
    ])?;
    assert_eq!(sleeper.read_line()?, "started");
    // setpriv execs sh: its children are the sleeps.
    let sleeps = children_by_scan(sleeper.pid());
    assert!(sleeps.len() >= 51, "{} sleeps", sleeps.len());
    for (n, pid) in sleeps.iter().take(50).enumerate() {
        member.cli_ok(
            &daemon,
            &[
                "register",
                "--pid",
                &pid.to_string(),
                "--analysis-id",
                &format!("m{n}"),
            ],
        )?;
    }
    let line = one_line_error(&member.cli(
        &daemon,
        &[
            "register",
            "--pid",
            &sleeps[50].to_string(),
            "--analysis-id",
            "m50",
        ],
    ));
    assert!(
        line.contains("refused by quota analyses-per-user")
            && line.contains("hold 50 analyses")
            && line.contains("--user-max-analyses"),
        "{line}"
    );
    // Root is not counted, and its analysis keeps its deadline across a restart.
    let root_job = Workload::spawn("sleep", &["600"])?;
    daemon.register_with(root_job.pid(), "root-job", &["--timeout", "1h"])?;
    daemon.restart()?;
    let text = daemon.cli_ok(&["dump-tree", "--json", "--analysis-id", "root-job"])?;
    let tree: serde_json::Value = serde_json::from_str(&text)?;
    let left = tree["analyses"][0]["deadline_in_ms"].as_i64().unwrap_or(0);
    assert!(
        (3_500_000..=3_600_000).contains(&left),
        "resumed with its deadline: {left} ms left"
    );
    assert_eq!(tree["processes"][0]["pid"], root_job.pid());
    sleeper.kill()?;
    Ok(())
}

/// A GET to the daemon's HTTP listener made by `user` (Python's urllib, no token):
/// the status code and the body.
fn http_get_as(user: &User, port: u16, path: &str) -> Result<(u16, String)> {
    const GET: &str = r#"
import sys, urllib.error, urllib.request
try:
    answer = urllib.request.urlopen(sys.argv[1])
    code, body = answer.status, answer.read()
except urllib.error.HTTPError as refused:
    code, body = refused.code, refused.read()
print(code)
sys.stdout.write(body.decode())
"#;
    let url = format!("http://127.0.0.1:{port}{path}");
    let out = Command::new("setpriv")
        .args(user.argv(&["/usr/bin/python3", "-c", GET, &url]))
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let (code, body) = text.split_once('\n').context("a status line")?;
    Ok((code.parse()?, body.to_string()))
}

/// Whether `user` can read `path` (`cat` as that user).
fn readable_by(user: &User, path: &std::path::Path) -> bool {
    let path = path.display().to_string();
    Command::new("setpriv")
        .args(user.argv(&["cat", &path]))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Nothing about a user's processes reaches whoever may not see it. Over HTTP, only a
/// request bearing the token in the root-only token file is told about processes: a
/// member of the socket group and a stranger both get 401 from `/status` and the
/// page's JSON, and `/metrics` (theirs to read) holds no command line. The state
/// directory (database, spool, token) is root's alone, the daemon started by hand.
#[test]
fn a_member_and_a_stranger_read_no_process_over_http_and_no_state_file() -> Result<()> {
    let mut accounts = Accounts::new("see");
    let group = accounts.group("sock")?;
    let member = accounts.user("m", &[&group])?;
    let stranger = accounts.user("s", &[])?;
    let port = free_port()?;
    let daemon = Daemon::builder()
        .http_port(port)
        .arg("--socket-group", &group)
        .start()?;
    std::fs::set_permissions(&daemon.dir, std::fs::Permissions::from_mode(0o755))?;
    const SECRET: &str = "--password=hunter2-for-the-test";
    let work = member.spawn(&[
        "/usr/bin/python3",
        "-c",
        "import time; time.sleep(600)",
        SECRET,
    ])?;
    let pid = work.pid().to_string();
    member.cli_ok(
        &daemon,
        &[
            "register",
            "--pid",
            &pid,
            "--analysis-id",
            "secretive",
            "--timeout",
            "1s",
        ],
    )?;
    daemon.await_records_for(&[work.pid()])?;

    let (code, status) = daemon.http_get(port, "/status")?;
    assert_eq!(code, 200, "{status}");
    assert!(
        status.contains(SECRET),
        "with the token, the record is shown"
    );
    for user in [&member, &stranger] {
        for path in ["/status", "/api/analyses", "/api/events"] {
            let (code, body) = http_get_as(user, port, path)?;
            assert_eq!(code, 401, "{} GET {path}: {body}", user.name);
            assert!(
                !body.contains(SECRET) && !body.contains("secretive"),
                "{body}"
            );
            assert!(
                body.contains("http-token"),
                "the refusal names the file: {body}"
            );
        }
        let (code, metrics) = http_get_as(user, port, "/metrics")?;
        assert_eq!(code, 200);
        assert!(metrics.contains("watchdog_kills_total"), "{metrics}");
        assert!(!metrics.contains(SECRET) && !metrics.contains("secretive"));
        let (code, _) = http_get_as(user, port, "/")?;
        assert_eq!(code, 200, "the page itself holds nothing");
    }

    let state = daemon.state_dir();
    let mode =
        |path: &std::path::Path| Ok::<_, anyhow::Error>(std::fs::metadata(path)?.mode() & 0o777);
    assert_eq!(mode(&state)?, 0o700, "the state directory");
    for file in ["watchdog.db", "spool.jsonl", "http-token"] {
        let path = state.join(file);
        assert_eq!(mode(&path)?, 0o600, "{file}");
        for user in [&member, &stranger] {
            assert!(!readable_by(user, &path), "{} reads {file}", user.name);
        }
    }
    Ok(())
}
