//! Fuzzing the control protocol with proptest, bounded so it runs in every
//! `cargo test -p watchdog-user --lib` (and so in `cargo xtask test`): arbitrary bytes
//! and arbitrary well-formed requests go through the code the socket runs, the framing
//! ([`LineReader`]), the parser ([`parse_request`]) and the connection loop ([`converse`]),
//! and through the handler ([`requests::route`], the dispatch the daemon uses,) into the rules core on a fake /proc.
//! Asserted: no panic, exactly one response line per request line, every error one
//! line with a kind that parses back, and the read buffer never past the limit.
//!
//! `PROPTEST_CASES` sets the cases per property (default below); a failure is kept in
//! `proptest-regressions/` and replayed first from then on.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use proptest::{collection::vec, option, prelude::*};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, ReadBuf},
    sync::mpsc,
};

use crate::{
    api::{
        control::{Call, Frame, LineReader, Places, converse},
        protocol::{
            BadRequest, MAX_REQUEST_BYTES, Reply, Request, Response, TestFault, parse_request,
        },
        report,
        requests::{self, Routed},
    },
    core::{
        Clock, Core, Registration, Settings, Watch,
        procs::{ProcInfo, Procs as _},
        tests::FakeProcs,
    },
    store::EventFilter,
    vocab::{
        error::ErrorKind,
        limits::{LimitOverrides, Limits, MemoryMetric, OrphanPolicy},
        peer::Peer,
        process::{AnalysisKey, ProcRef},
    },
};

/// Cases per property unless `PROPTEST_CASES` says otherwise: a few thousand, the whole
/// file in a few seconds on the 2-core CI machine (debug build).
const DEFAULT_CASES: u32 = 2000;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig::with_cases(cases)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
}

/// A reader handing out `data` in chunks of the given sizes (cycled), as a socket
/// would, counting what was taken.
struct Chunked {
    data: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    next: usize,
}

impl Chunked {
    fn new(data: Vec<u8>, sizes: Vec<usize>) -> Self {
        Self {
            data,
            at: 0,
            sizes,
            next: 0,
        }
    }
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let size = self.sizes[self.next % self.sizes.len()].max(1);
        self.next += 1;
        let n = size.min(buf.remaining()).min(self.data.len() - self.at);
        buf.put_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

// ---- strategies ------------------------------------------------------------------

/// Pids around the fake world's processes, and the ones the rules refuse outright.
fn pid() -> BoxedStrategy<u32> {
    prop_oneof![95u32..125, Just(0), Just(1), Just(SELF_PID), any::<u32>(),].boxed()
}

/// Ids that collide (so requests meet each other's analyses), and anything at all.
fn analysis_id() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec!["a", "b", "c", "", " "]).prop_map(String::from),
        any::<String>(),
        "[a-z\n\"\\\\]{0,300}",
    ]
    .boxed()
}

fn small_u64() -> BoxedStrategy<u64> {
    prop_oneof![Just(0u64), 1u64..100_000, any::<u64>()].boxed()
}

fn limits() -> BoxedStrategy<LimitOverrides> {
    (
        option::of(small_u64()),
        option::of(small_u64()),
        option::of(small_u64()),
        option::of(small_u64()),
        option::of(prop_oneof![
            Just(OrphanPolicy::Kill),
            Just(OrphanPolicy::Log)
        ]),
        option::of(small_u64()),
    )
        .prop_map(
            |(timeout_ms, memory_bytes, tree_memory_bytes, grace_ms, orphans, max_processes)| {
                LimitOverrides {
                    timeout_ms,
                    memory_bytes,
                    tree_memory_bytes,
                    grace_ms,
                    orphans,
                    max_processes,
                    ..LimitOverrides::default()
                }
            },
        )
        .boxed()
}

fn request() -> BoxedStrategy<Request> {
    prop_oneof![
        4 => (pid(), analysis_id(), limits(), any::<bool>()).prop_map(
            |(pid, analysis_id, limits, fresh)| Request::Register {
                pid,
                analysis_id,
                limits,
                fresh,
            }
        ),
        2 => (pid(), analysis_id(), limits()).prop_map(|(pid, analysis_id, limits)| {
            Request::Launch {
                pid,
                analysis_id,
                limits,
            }
        }),
        2 => (option::of(pid()), option::of(analysis_id()))
            .prop_map(|(pid, analysis_id)| Request::Unregister { pid, analysis_id }),
        1 => option::of(analysis_id()).prop_map(|analysis_id| Request::DumpTree { analysis_id }),
        1 => Just(Request::Status),
        1 => Just(Request::Overview),
        1 => any::<u64>().prop_map(|run| Request::Wait { run }),
        1 => (
            option::of(any::<String>()),
            option::of(analysis_id()),
            option::of(any::<String>()),
            option::of(any::<String>()),
            option::of(any::<u32>()),
        )
            .prop_map(|(since, analysis_id, reason, host, limit)| Request::Events {
                filter: EventFilter {
                    since,
                    analysis_id,
                    reason,
                    host,
                    limit,
                    before: None,
                },
            }),
        1 => any::<u64>().prop_map(|ms| Request::Stall { ms }),
        1 => Just(Request::Fault {
            what: TestFault::StorePanic
        }),
    ]
    .boxed()
}

/// A request line's bytes, newline not included: arbitrary bytes, a well-formed
/// request, or a well-formed one cut short or with one byte changed.
fn line() -> BoxedStrategy<Vec<u8>> {
    let well_formed =
        || request().prop_map(|r| serde_json::to_vec(&r).expect("requests serialize"));
    prop_oneof![
        2 => vec(any::<u8>(), 0..200),
        4 => well_formed(),
        2 => (well_formed(), any::<prop::sample::Index>())
            .prop_map(|(mut json, at)| {
                json.truncate(at.index(json.len() + 1));
                json
            }),
        2 => (well_formed(), any::<prop::sample::Index>(), any::<u8>())
            .prop_map(|(mut json, at, byte)| {
                let i = at.index(json.len());
                json[i] = byte;
                json
            }),
    ]
    // The newline is the frame: inside a line it would make two.
    .prop_map(|mut bytes| {
        bytes.retain(|&b| b != b'\n');
        bytes
    })
    .boxed()
}

// ---- the checks --------------------------------------------------------------------

/// One response line: JSON of a response, an error message without a control character
/// (the CLI prints it on one line) and with a kind; written again, the same JSON.
fn check_response_line(line: &str) -> Result<Response, TestCaseError> {
    let json: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {line:?}")))?;
    if json.get("error").is_some() {
        prop_assert!(
            json["error"].is_string(),
            "an error that is not a string: {line}"
        );
        let kind = serde_json::from_value::<ErrorKind>(json["kind"].clone());
        prop_assert!(kind.is_ok(), "an error without a known kind: {line}");
    }
    let response: Response = serde_json::from_value(json.clone())
        .map_err(|e| TestCaseError::fail(format!("not a response ({e}): {line:?}")))?;
    prop_assert_eq!(
        serde_json::to_value(&response).expect("responses serialize"),
        json,
        "does not parse back"
    );
    if let Response::Error { error, .. } = &response {
        prop_assert!(
            !error.chars().any(char::is_control),
            "an error of more than one line: {error:?}"
        );
        prop_assert!(!error.is_empty(), "an empty error");
    }
    Ok(response)
}

/// The split a correct framing makes: lines, and whether it ends with one too long.
fn reference_frames(data: &[u8], max: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut parts = data.split(|&b| b == b'\n').peekable();
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        if part.len() > max {
            frames.push(Frame::TooLong(max + 1));
            return frames;
        }
        if last {
            if !part.is_empty() {
                frames.push(Frame::Line(part.to_vec()));
            }
        } else {
            frames.push(Frame::Line(part.to_vec()));
        }
    }
    frames.push(Frame::End);
    frames
}

const SELF_PID: u32 = 999;
/// The uid of the fake world's user processes, and the admin group.
const USER: u32 = 1000;
const ADMINS: u32 = 50;
/// The fake world's pids: 100..=120 (those above 110 run as USER).
const PIDS: std::ops::RangeInclusive<u32> = 100..=120;

/// The callers a session may come from: root, the user owning half the processes,
/// another user, an admin-group member, and the HTTP listener.
fn peer() -> BoxedStrategy<Peer> {
    prop::sample::select(vec![
        Peer::root(),
        Peer::user(USER, &[]),
        Peer::user(USER + 1, &[]),
        Peer::user(USER + 2, &[ADMINS]),
        Peer::http(),
    ])
    .boxed()
}

/// The effects of a registration on the fake world: descendants from the fake /proc,
/// each process checked by `permit` as the real walk does.
struct FakeWatch<'a>(&'a FakeProcs);

impl Watch for FakeWatch<'_> {
    fn launch(&mut self, _registration: &Registration) -> anyhow::Result<()> {
        Ok(())
    }

    fn descendants(&mut self, root: ProcRef) -> anyhow::Result<Vec<ProcRef>> {
        let mut found = Vec::new();
        let mut parents = vec![root.pid];
        while let Some(parent) = parents.pop() {
            for child in PIDS
                .filter_map(|p| self.0.read(p))
                .filter(|p| p.ppid == parent)
            {
                parents.push(child.pid);
                found.push(child.proc_ref());
            }
        }
        Ok(found)
    }

    fn watch(
        &mut self,
        registration: &Registration,
        fresh: bool,
        analysis_of: &dyn Fn(u32) -> Option<AnalysisKey>,
        permit: &dyn Fn(ProcRef) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<ProcInfo>> {
        let root = registration.root.proc_ref();
        let mut processes = vec![root];
        if !fresh {
            processes.extend(self.descendants(root)?);
        }
        let mut watched = Vec::new();
        for process in processes {
            if analysis_of(process.pid).is_some() {
                continue;
            }
            permit(process)?;
            watched.extend(self.0.read(process.pid));
        }
        Ok(watched)
    }
}

/// The daemon loop's side of the session, on a fake world: pids 100..=120 live, with
/// 50 as their launcher; each call answered through the same handler the daemon uses.
async fn fake_loop(mut calls: mpsc::Receiver<Call>) -> usize {
    let procs = FakeProcs::default();
    procs.spawn(1, 0, 0);
    procs.spawn(50, 1, 50_000);
    for pid in PIDS {
        let ppid = if pid % 3 == 0 { pid - 1 } else { 50 };
        if pid > 110 {
            procs.spawn_as(pid, ppid, USER);
        } else {
            procs.spawn(pid, ppid, u64::from(pid) * 1000);
        }
    }
    let defaults = Limits::for_tests(60_000, 100 << 20);
    let settings = Settings {
        defaults,
        dry_run: false,
        remove_shm: false,
        machine_memory: Some(1 << 34),
        admin_gid: Some(ADMINS),
        memory_metric: MemoryMetric::Rss,
        quotas: Default::default(),
        kernel_refuses_forks: false,
    };
    let mut core = Core::new(settings, "host".into(), SELF_PID);
    let started = Instant::now();
    let mut clock = Clock {
        now: started,
        wall: SystemTime::now(),
        boot_ns: 10_000_000_000,
    };
    let mut answered = 0;
    let mut history = crate::api::overview::RssHistory::default();
    while let Some((request, peer, reply)) = calls.recv().await {
        // The daemon's own dispatch, without --test-faults (as a production daemon
        // runs); what only the loop holds is answered from the fake world.
        let routed = requests::route(
            &mut core,
            request,
            &peer,
            false,
            &procs,
            &clock,
            &mut FakeWatch(&procs),
        );
        let response = match routed {
            Routed::Answered(response) => response,
            Routed::Status => {
                let counters = report::KernelCounters {
                    lost_events: 0,
                    watch_map_full: 0,
                    pinned_state_dropped: 0,
                    last_poll_us: 0,
                    loop_longest_us: 0,
                    faults: Default::default(),
                    records_unqueued: 0,
                    control: Default::default(),
                    paths: Vec::new(),
                };
                let status =
                    report::status(&core, &counters, started, Duration::from_secs(30), &clock);
                Response::Ok(Reply::Status(Box::new(status)))
            }
            Routed::Events(_) => Response::Ok(Reply::Events {
                records: Vec::new(),
                database_error: None,
                next: None,
            }),
            Routed::Overview => Response::Ok(Reply::Overview(Box::new(
                crate::api::overview::overview(&core, &history, &clock),
            ))),
            Routed::Wait(run) => requests::ended(run, core.run_state(run)).unwrap_or_else(|| {
                Response::error(ErrorKind::Unavailable, "the fake loop does not wait")
            }),
            Routed::Stall(_) | Routed::Fault(_) => {
                unreachable!("test faults are routed only where --test-faults is given")
            }
        };
        // The effects are not the protocol's: what the core asked for is dropped.
        core.take_actions();
        clock = clock.advanced(Duration::from_millis(10));
        core.on_tick(&procs, &clock);
        core.take_actions();
        history.record(clock.wall, crate::api::overview::rss_sums(&core));
        answered += 1;
        let _ = reply.send(response);
    }
    answered
}

/// Feeds `input` to the connection loop in `chunks`, against the fake loop: the lines
/// written back, and how many calls reached the loop.
fn session(input: Vec<u8>, chunks: Vec<usize>, peer: &Peer) -> (String, usize) {
    runtime().block_on(async move {
        let (tx, rx) = mpsc::channel::<Call>(4);
        let mut out = Vec::new();
        let talk = async {
            let place = Places::new(1).admit().expect("a free place");
            converse(
                Chunked::new(input, chunks),
                &mut out,
                peer,
                &tx,
                Duration::from_secs(3600),
                place,
            )
            .await;
            drop(tx);
        };
        let ((), answered) = tokio::join!(talk, fake_loop(rx));
        (
            String::from_utf8(out).expect("responses are UTF-8"),
            answered,
        )
    })
}

proptest! {
    #![proptest_config(config())]

    /// Framing: arbitrary bytes in arbitrary chunks split exactly as `split('\n')`
    /// would, a line over the limit stops the reading, and the buffer stays within it.
    #[test]
    fn framing_matches_the_reference_and_stays_bounded(
        data in prop_oneof![
            vec(any::<u8>(), 0..600),
            vec(prop::sample::select(vec![b'a', b'\n', 0xff]), 0..600),
        ],
        chunks in vec(1usize..200, 1..8),
        max in 1usize..100,
    ) {
        let expected = reference_frames(&data, max);
        let (frames, capacities, read) = runtime().block_on(async {
            let mut reader = Chunked::new(data.clone(), chunks);
            let mut lines = LineReader::new(max);
            let mut frames = Vec::new();
            let mut capacities = Vec::new();
            loop {
                let frame = lines.next(&mut reader).await.expect("in-memory reads");
                capacities.push(lines.capacity());
                let done = !matches!(frame, Frame::Line(_));
                frames.push(frame);
                if done {
                    return (frames, capacities, reader.at);
                }
            }
        });
        prop_assert_eq!(&frames, &expected);
        for capacity in capacities {
            prop_assert!(capacity <= max + 1, "buffer of {} for a limit of {}", capacity, max);
        }
        if matches!(frames.last(), Some(Frame::TooLong(_))) {
            // Nothing past the over-long line's first max + 1 bytes was read.
            let start = data.split(|&b| b == b'\n')
                .take_while(|part| part.len() <= max)
                .map(|part| part.len() + 1)
                .sum::<usize>();
            prop_assert!(read <= start + max + 1, "read {} bytes, line began at {}", read, start);
        }
    }

    /// The parser: any bytes give a request or a one-line error, never a panic.
    #[test]
    fn any_bytes_parse_to_a_request_or_a_one_line_error(bytes in vec(any::<u8>(), 0..400)) {
        match parse_request(&bytes) {
            Ok(request) => {
                prop_assert!(std::str::from_utf8(&bytes).is_ok());
                serde_json::to_string(&request).expect("requests serialize");
            }
            Err(err) => {
                let line = err.response().to_line();
                prop_assert_eq!(line.matches('\n').count(), 1);
                prop_assert!(line.ends_with('\n'));
                let response = check_response_line(line.trim_end_matches('\n'))?;
                prop_assert!(
                    matches!(response, Response::Error { kind: ErrorKind::BadRequest, .. }),
                    "{:?}",
                    response
                );
                if std::str::from_utf8(&bytes).is_err() {
                    prop_assert!(matches!(err, BadRequest::NotUtf8(_)), "{:?}", err);
                }
            }
        }
    }

    /// Every well-formed request parses back to itself.
    #[test]
    fn well_formed_requests_parse_back(request in request()) {
        let json = serde_json::to_string(&request).expect("requests serialize");
        let parsed = parse_request(json.as_bytes())
            .map_err(|e| TestCaseError::fail(format!("{json}: {e}")))?;
        prop_assert_eq!(serde_json::to_string(&parsed).expect("serializes"), json);
    }

    /// A session: lines of any kind, sent in any chunks, through the connection loop
    /// and the handler into the rules core. One response line per request line, each
    /// a response, every error one line; the handler sees exactly the lines that parse.
    #[test]
    fn every_request_line_gets_exactly_one_response(
        lines in vec(line(), 1..25),
        chunks in vec(1usize..400, 1..6),
        unterminated in any::<bool>(),
        peer in peer(),
    ) {
        let mut input = lines.join(&b'\n');
        if !unterminated || lines.last().is_some_and(Vec::is_empty) {
            input.push(b'\n');
        }
        let parsed = lines.iter().filter(|l| parse_request(l).is_ok()).count();
        let (out, answered) = session(input, chunks, &peer);
        prop_assert!(out.ends_with('\n'), "{:?}", out);
        let responses: Vec<&str> = out.lines().collect();
        prop_assert_eq!(responses.len(), lines.len(), "{}", out);
        prop_assert_eq!(answered, parsed);
        for (line, response) in lines.iter().zip(responses) {
            let response = check_response_line(response)?;
            if parse_request(line).is_err() {
                prop_assert!(
                    matches!(response, Response::Error { kind: ErrorKind::BadRequest, .. }),
                    "{:?}",
                    response
                );
            }
        }
    }
}

/// A line far over the limit: one error, the connection ends, and of the line no more
/// than the limit and one byte was read.
#[test]
fn an_oversized_line_gets_one_error_and_is_not_read_further() {
    let mut input = vec![b'x'; 10 * MAX_REQUEST_BYTES];
    input.extend_from_slice(b"\n{\"op\":\"status\"}\n");
    let total = input.len();
    let (out, answered) = session(input, vec![7000], &Peer::root());
    let responses: Vec<&str> = out.lines().collect();
    assert_eq!(responses.len(), 1, "{out}");
    let Response::Error {
        error: message,
        kind: ErrorKind::BadRequest,
    } = serde_json::from_str(responses[0]).unwrap()
    else {
        panic!("not a bad request: {out}");
    };
    assert!(message.contains("request too long"), "{message}");
    assert!(message.contains("at most 64 KiB"), "{message}");
    assert_eq!(answered, 0);
    let _ = total;
}

/// Invalid UTF-8: an error naming it, and the connection answers the next line.
#[test]
fn invalid_utf8_gets_an_error_and_the_next_line_is_answered() {
    let (out, answered) = session(
        b"{\"op\":\"st\xffatus\"}\n{\"op\":\"status\"}\n".to_vec(),
        vec![5],
        &Peer::root(),
    );
    let responses: Vec<Response> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(responses.len(), 2, "{out}");
    let Response::Error {
        error: message,
        kind: ErrorKind::BadRequest,
    } = &responses[0]
    else {
        panic!("{out}")
    };
    assert!(message.contains("invalid UTF-8 at byte 9"), "{message}");
    assert!(
        matches!(responses[1], Response::Ok(Reply::Status(_))),
        "{out}"
    );
    assert_eq!(answered, 1);
}

/// A client that sends nothing, or half a line, is answered with the timeout's error
/// and the connection is closed.
#[test]
fn an_idle_connection_times_out_with_an_error() {
    for sent in [&b""[..], b"{\"op\":"] {
        let out = runtime().block_on(async {
            let (client, server) = tokio::io::duplex(1024);
            let (read, write) = tokio::io::split(server);
            let (mut client_read, mut client_write) = tokio::io::split(client);
            client_write.write_all(sent).await.unwrap();
            let (tx, _rx) = mpsc::channel::<Call>(1);
            let place = Places::new(1).admit().expect("a free place");
            converse(
                read,
                write,
                &Peer::root(),
                &tx,
                Duration::from_millis(50),
                place,
            )
            .await;
            let mut out = String::new();
            client_read.read_to_string(&mut out).await.unwrap();
            out
        });
        assert_eq!(out.lines().count(), 1, "{out}");
        let Response::Error {
            error: message,
            kind: ErrorKind::BadRequest,
        } = serde_json::from_str(out.trim_end()).unwrap()
        else {
            panic!("{out}")
        };
        assert!(
            message.contains("no complete request within 0.05s"),
            "{message}"
        );
    }
}

/// All places taken: a newcomer takes the place of the connection idle longest, which
/// is told so and closed; when none is idle, the newcomer is refused.
#[test]
fn a_newcomer_takes_the_longest_idle_place_and_is_refused_when_none_is_idle() {
    runtime().block_on(async {
        let places = Places::new(2);
        let (tx, mut rx) = mpsc::channel::<Call>(4);
        let connect = |place| {
            let (client, server) = tokio::io::duplex(4096);
            let (read, write) = tokio::io::split(server);
            let tx = tx.clone();
            tokio::spawn(async move {
                converse(
                    read,
                    write,
                    &Peer::root(),
                    &tx,
                    Duration::from_secs(60),
                    place,
                )
                .await;
            });
            client
        };
        // A, then B: both idle, A the longer.
        let mut a = connect(places.admit().expect("a free place"));
        let mut b = connect(places.admit().expect("a free place"));
        // B becomes busy: its request waits for the loop.
        b.write_all(b"{\"op\":\"status\"}\n").await.unwrap();
        let (_, _, reply_b) = rx.recv().await.expect("B's request reaches the loop");
        // A newcomer, C, takes A's place: A gets its error and is closed.
        let mut c = connect(places.admit().expect("the idle one's place"));
        let mut out = String::new();
        a.read_to_string(&mut out).await.unwrap();
        assert!(out.contains("closed while idle"), "{out}");
        assert!(out.contains(r#""kind":"unavailable""#), "{out}");
        assert_eq!(out.lines().count(), 1, "{out}");
        // C becomes busy too: with both places busy, a newcomer is refused.
        c.write_all(b"{\"op\":\"status\"}\n").await.unwrap();
        let (_, _, reply_c) = rx.recv().await.expect("C's request reaches the loop");
        assert!(places.admit().is_none(), "a place while all are busy");
        // Answered, both are idle again and B, the longer idle, gives its place.
        for (reply, client) in [(reply_b, &mut b), (reply_c, &mut c)] {
            let _ = reply.send(Response::error(ErrorKind::Internal, "done"));
            let mut line = vec![0; 64];
            let n = client.read(&mut line).await.unwrap();
            assert!(String::from_utf8_lossy(&line[..n]).contains("done"));
        }
        let _d = places.admit().expect("an idle one's place");
        let mut out = String::new();
        b.read_to_string(&mut out).await.unwrap();
        assert!(out.contains("closed while idle"), "{out}");
    });
}
