//! The CLI writing into a pipe whose reader is gone (`watchdog-user status | head -0`):
//! it stops quietly, killed by SIGPIPE as `ls` would be, with no panic. The daemon is a
//! fake one on a socket of this test's, answering each request with an empty reply.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{net::UnixListener, process::ExitStatusExt as _},
    process::{Command, Stdio},
};

use watchdog_tests::{Reply, Request, Response, scratch_dir, watchdog_bin};

#[test]
fn cli_output_into_a_closed_pipe_ends_quietly() {
    let dir = scratch_dir("cli-pipe").unwrap();
    let socket = dir.join("control.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let commands: [&[&str]; 3] = [&["status"], &["dump-tree"], &["events"]];
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let reply = match serde_json::from_str(&line).unwrap() {
                Request::Status => Reply::Status(Box::default()),
                Request::DumpTree { .. } => Reply::Tree {
                    processes: Vec::new(),
                    analyses: Vec::new(),
                },
                Request::Events { .. } => Reply::Events {
                    records: Vec::new(),
                    database_error: None,
                    next: None,
                },
                other => panic!("not asked: {other:?}"),
            };
            let _ = (&stream).write_all(Response::Ok(reply).to_line().as_bytes());
        }
    });
    for args in commands {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let out = Command::new(watchdog_bin())
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdout(Stdio::from(write))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.is_empty(), "{args:?} said: {stderr}");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?}",
            out.status
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
