//! The write-ahead spool: every kill record is appended here and fsync'd before the
//! database sees it, and removed only once the database has committed it. A database
//! outage, or a daemon restart in the middle of one, loses nothing; replays are
//! idempotent because each record carries a unique id.
//!
//! The file is one JSON record per line, read as bytes (a line cut inside a multi-byte
//! character is just a line that does not parse). It is kept whole: opening it cuts a
//! torn last line (a crash mid-append) and moves a complete line that does not parse to
//! a side file (`spool.jsonl.corrupt`), never deleting it; an append that fails midway
//! (disk full) is cut back, so the next one never glues onto a partial line. Records
//! whose append failed stay in memory (`held`) and are appended again later, all in one
//! write and one fsync with whatever arrived meanwhile.

use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use serde::{Deserialize, Serialize};

use crate::vocab::record::KillRecord;

/// A kill record as stored: with the id that makes its insert idempotent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredRecord {
    pub event_uid: String,
    #[serde(flatten)]
    pub record: KillRecord,
}

/// How every spooled line starts (`StoredRecord` serializes its id first). Inside a
/// JSON string a quote is escaped, so these bytes only ever start a record.
const RECORD_START: &[u8] = b"{\"event_uid\":";

pub struct Spool {
    path: PathBuf,
    file: File,
    /// Bytes of whole records in the file: where the next append starts, and what a
    /// failed one is cut back to.
    len: u64,
    /// Records in the file, waiting for the database.
    depth: usize,
    /// Records not yet in the file, oldest first: appended at the next `flush`; after a
    /// failed one, kept and tried again.
    held: Vec<StoredRecord>,
    /// Why the last append failed, while records are held because of it.
    error: Option<String>,
    /// A failed append could not be cut back: cut before the next one.
    dirty: bool,
    /// Records appended and fsyncs made since open.
    appended: u64,
    syncs: u64,
    /// Tests: the next append writes this many bytes, then fails as a full disk does.
    #[cfg(test)]
    fail_after: Option<usize>,
}

/// What a read of the spool's bytes found.
#[derive(Default)]
struct Scan<'a> {
    records: Vec<StoredRecord>,
    /// The bytes of each record, without its '\n': what a rewritten spool holds.
    kept: Vec<&'a [u8]>,
    /// End of the last whole line (just past its '\n').
    whole_len: usize,
    /// Complete lines (or the torn fragments before a record glued onto them) that do
    /// not parse: moved to the side file.
    corrupt: Vec<&'a [u8]>,
    /// Records recovered from a line where they had been glued onto a torn fragment
    /// (what an append after a torn tail made, before the spool cut torn tails).
    salvaged: usize,
    /// Bytes after the last '\n' that are not a whole record: a torn append.
    torn: &'a [u8],
    /// The last line is a whole record that lacks only its '\n'.
    unterminated: bool,
    /// Empty lines: nothing to keep, nothing lost.
    blank: usize,
}

impl<'a> Scan<'a> {
    fn of(bytes: &'a [u8]) -> Self {
        let mut scan = Scan::default();
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            scan.line(&rest[..end]);
            scan.whole_len += end + 1;
            rest = &rest[end + 1..];
        }
        if !rest.is_empty() {
            match serde_json::from_slice(rest) {
                Ok(record) => {
                    scan.records.push(record);
                    scan.kept.push(rest);
                    scan.unterminated = true;
                }
                Err(_) => scan.torn = rest,
            }
        }
        scan
    }

    fn line(&mut self, line: &'a [u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            self.blank += 1;
            return;
        }
        if let Ok(record) = serde_json::from_slice(line) {
            self.records.push(record);
            self.kept.push(line);
            return;
        }
        // A record appended after a torn line sits at the end of the glued line.
        let glued = line
            .windows(RECORD_START.len())
            .rposition(|w| w == RECORD_START)
            .filter(|&at| at > 0)
            .and_then(|at| Some((at, serde_json::from_slice(&line[at..]).ok()?)));
        match glued {
            Some((at, record)) => {
                self.corrupt.push(&line[..at]);
                self.records.push(record);
                self.kept.push(&line[at..]);
                self.salvaged += 1;
            }
            None => self.corrupt.push(line),
        }
    }

    /// The file holds exactly its records, each with its '\n'.
    fn clean(&self) -> bool {
        self.corrupt.is_empty() && self.torn.is_empty() && !self.unterminated && self.blank == 0
    }
}

impl Spool {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = open_append(path)?;
        let mut spool = Self {
            path: path.to_path_buf(),
            file,
            len: 0,
            depth: 0,
            held: Vec::new(),
            error: None,
            dirty: false,
            appended: 0,
            syncs: 0,
            #[cfg(test)]
            fail_after: None,
        };
        spool.repair()?;
        Ok(spool)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where lines that do not parse are moved: `<spool>.corrupt`.
    pub fn corrupt_path(&self) -> PathBuf {
        self.side_path(".corrupt")
    }

    /// Where records the database refuses for good are moved: `<spool>.rejected`.
    fn rejected_path(&self) -> PathBuf {
        self.side_path(".rejected")
    }

    fn side_path(&self, suffix: &str) -> PathBuf {
        let mut name = OsString::from(self.path.as_os_str());
        name.push(suffix);
        name.into()
    }

    /// Keeps a record the database refused for good (a constraint it breaks) in
    /// `<spool>.rejected`, durably, so that it stops blocking the records behind it
    /// and is still there for whoever fixes the cause.
    pub fn set_aside(&self, record: &StoredRecord) -> Result<PathBuf> {
        let path = self.rejected_path();
        let mut line = serde_json::to_vec(record).expect("records serialize");
        line.push(b'\n');
        append_durably(&path, &line)?;
        Ok(path)
    }

    /// Records in the file, waiting for the database.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Records waiting to be appended (after a failed append: held in memory).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Why the last append failed, while records are held because of it.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Records appended, and fsyncs made, since the spool was opened.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// Takes a record; it reaches the file at the next `flush`.
    pub fn push(&mut self, record: StoredRecord) {
        self.held.push(record);
    }

    /// Takes records; they reach the file at the next `flush`.
    pub fn extend(&mut self, records: impl IntoIterator<Item = StoredRecord>) {
        self.held.extend(records);
    }

    /// Appends every held record in one write and makes them durable with one fsync;
    /// returns how many. On failure nothing of it stays in the file (it is cut back to
    /// its length before) and the records stay held for the next try.
    pub fn flush(&mut self) -> Result<usize> {
        if self.held.is_empty() {
            return Ok(0);
        }
        let mut lines = Vec::with_capacity(self.held.len() * 512);
        for record in &self.held {
            serde_json::to_writer(&mut lines, record).expect("records serialize");
            lines.push(b'\n');
        }
        match self.write_durably(&lines) {
            Ok(()) => {
                let n = self.held.len();
                self.len += lines.len() as u64;
                self.depth += n;
                self.appended += n as u64;
                self.held.clear();
                self.error = None;
                Ok(n)
            }
            Err(err) => {
                if self.cut_back().is_err() {
                    self.dirty = true;
                }
                let err = anyhow::Error::new(err)
                    .context(format!("appending to the spool {}", self.path.display()));
                self.error = Some(format!("{err:#}"));
                Err(err)
            }
        }
    }

    fn write_durably(&mut self, lines: &[u8]) -> std::io::Result<()> {
        if self.dirty {
            self.cut_back()?;
            self.dirty = false;
        }
        #[cfg(test)]
        if let Some(n) = self.fail_after.take() {
            self.file.write_all(&lines[..n.min(lines.len())])?;
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.file.write_all(lines)?;
        self.syncs += 1;
        self.file.sync_data()
    }

    /// Cuts the file back to its whole records (a failed append left a part of one).
    fn cut_back(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.len)?;
        self.file.sync_data()
    }

    /// Every spooled record, oldest first, and how many bytes of the file they span.
    pub fn snapshot(&mut self) -> Result<(Vec<StoredRecord>, u64)> {
        let bytes = self.read()?;
        let scan = Scan::of(&bytes);
        if scan.clean() && scan.records.len() == self.depth {
            return Ok((scan.records, self.len));
        }
        // Changed behind our back (the file is ours alone): set it right, then read.
        drop(scan);
        self.repair()?;
        let bytes = self.read()?;
        Ok((Scan::of(&bytes).records, self.len))
    }

    /// The file's bytes up to the end of its whole records.
    fn read(&self) -> Result<Vec<u8>> {
        let mut bytes = std::fs::read(&self.path)
            .with_context(|| format!("reading the spool {}", self.path.display()))?;
        bytes.truncate(self.len.min(bytes.len() as u64) as usize);
        Ok(bytes)
    }

    /// Makes the file hold exactly its whole records: a torn last line is cut (it was
    /// never acknowledged, and the kill_event log line has it), complete lines that do
    /// not parse go to the side file, and records glued onto a torn line are kept. One
    /// log line says what was done.
    fn repair(&mut self) -> Result<()> {
        let bytes = std::fs::read(&self.path)
            .with_context(|| format!("reading the spool {}", self.path.display()))?;
        let scan = Scan::of(&bytes);
        self.depth = scan.records.len();
        if scan.clean() {
            self.len = bytes.len() as u64;
            return Ok(());
        }
        let path = self.path.display().to_string();
        if scan.corrupt.is_empty() && scan.salvaged == 0 && scan.blank == 0 {
            // The common case, a crash mid-append: cut the tail, or end the last record.
            if scan.unterminated {
                self.file.write_all(b"\n")?;
                self.len = bytes.len() as u64 + 1;
                tracing::warn!(
                    "spool {path}: its last record lacked its line end (a write cut short); ended it"
                );
            } else {
                self.len = scan.whole_len as u64;
                tracing::warn!(
                    "spool {path}: cut {} bytes of a torn last record (a write cut short by a crash \
                     or a full disk); the {} records before it are kept",
                    scan.torn.len(),
                    self.depth
                );
            }
            self.file.set_len(self.len)?;
            self.file.sync_data()?;
            return Ok(());
        }
        let corrupt_path = self.corrupt_path();
        if !scan.corrupt.is_empty() {
            let mut out = Vec::new();
            for line in &scan.corrupt {
                out.extend_from_slice(line);
                out.push(b'\n');
            }
            append_durably(&corrupt_path, &out)?;
        }
        let mut whole = Vec::with_capacity(bytes.len());
        for line in &scan.kept {
            whole.extend_from_slice(line);
            whole.push(b'\n');
        }
        self.replace(&whole)?;
        let mut done = Vec::new();
        if !scan.corrupt.is_empty() {
            done.push(format!(
                "{} unreadable lines ({} bytes) moved to {}",
                scan.corrupt.len(),
                scan.corrupt.iter().map(|l| l.len() + 1).sum::<usize>(),
                corrupt_path.display()
            ));
        }
        if scan.salvaged > 0 {
            done.push(format!(
                "{} records recovered from lines a torn write had glued them onto",
                scan.salvaged
            ));
        }
        if !scan.torn.is_empty() {
            done.push(format!(
                "cut {} bytes of a torn last record",
                scan.torn.len()
            ));
        }
        if scan.blank > 0 {
            done.push(format!("{} empty lines dropped", scan.blank));
        }
        tracing::warn!(
            "spool {path}: {}; the {} records are kept",
            done.join("; "),
            self.depth
        );
        Ok(())
    }

    /// Replaces the file's content (written aside, fsync'd, renamed over it).
    fn replace(&mut self, content: &[u8]) -> Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(content)
            .and_then(|()| file.sync_data())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), self.path.display()))?;
        if let Some(dir) = self.path.parent() {
            // The rename itself is durable once the directory is.
            File::open(dir).and_then(|d| d.sync_all()).ok();
        }
        self.file = open_append(&self.path)?;
        self.len = content.len() as u64;
        self.dirty = false;
        Ok(())
    }

    /// Every record waiting for the database, oldest first: those in the file, then
    /// those held in memory.
    pub fn waiting(&mut self) -> Result<Vec<StoredRecord>> {
        let (in_file, _) = self.snapshot()?;
        Ok(in_file
            .into_iter()
            .chain(self.held.iter().cloned())
            .collect())
    }

    /// Drops the first `bytes` (records now committed), keeping anything appended since.
    pub fn consume(&mut self, bytes: u64, records: usize) -> Result<()> {
        if bytes >= self.len {
            self.file.set_len(0)?;
            self.file.sync_data()?;
            self.len = 0;
        } else {
            // Only the part kept is read: the committed prefix is dropped unread.
            let mut rest = vec![0; (self.len - bytes) as usize];
            self.file
                .read_exact_at(&mut rest, bytes)
                .with_context(|| format!("reading the spool {}", self.path.display()))?;
            self.replace(&rest)?;
        }
        self.depth = self.depth.saturating_sub(records);
        Ok(())
    }
}

/// Appends `bytes` to a side file and fsyncs it.
fn append_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut side = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    side.write_all(bytes)
        .and_then(|()| side.sync_data())
        .with_context(|| format!("writing {}", path.display()))
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .with_context(|| format!("opening the spool {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::{
        limits::Reason,
        record::{KillRecord, Outcome},
    };

    fn record(n: u32, comm: &str) -> StoredRecord {
        StoredRecord {
            event_uid: format!("uid-{n}"),
            record: KillRecord {
                time: "2026-01-01T00:00:00.000Z".into(),
                host: "h".into(),
                pid: n,
                ppid: 1,
                analysis_id: "a".into(),
                reason: Reason::Timeout,
                limit: Some(1000),
                rss_bytes: 1,
                runtime_ms: 1,
                signals: Vec::new(),
                outcome: Outcome::ExitedAfterSigterm,
                comm: comm.into(),
                cmdline: format!("{comm} --run {n}"),
                owner_uid: None,
                warned_of: None,
                zombies: None,
                tree_pss_bytes: None,
                tree_rss_bytes: None,
                shmem_bytes: None,
                shm_left: Vec::new(),
                refused_forks: None,
                uid: 0,
            },
        }
    }

    fn line(record: &StoredRecord) -> Vec<u8> {
        let mut line = serde_json::to_vec(record).unwrap();
        line.push(b'\n');
        line
    }

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "watchdog-spool-{tag}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn spool(&self) -> PathBuf {
            self.0.join("spool.jsonl")
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn pids(spool: &mut Spool) -> Vec<u32> {
        spool
            .snapshot()
            .unwrap()
            .0
            .iter()
            .map(|r| r.record.pid)
            .collect()
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_next_append_stays_readable() {
        let dir = Dir::new("torn");
        let whole = line(&record(1, "sleep"));
        let torn = &line(&record(2, "sleep"))[..40];
        std::fs::write(dir.spool(), [whole.as_slice(), torn].concat()).unwrap();

        let mut spool = Spool::open(&dir.spool()).unwrap();
        assert_eq!(spool.depth(), 1);
        assert_eq!(
            std::fs::read(dir.spool()).unwrap(),
            whole,
            "cut to the whole record"
        );
        spool.push(record(3, "sleep"));
        assert_eq!(spool.flush().unwrap(), 1);
        assert_eq!(pids(&mut spool), vec![1, 3]);
        assert!(!spool.corrupt_path().exists(), "nothing was unreadable");
    }

    #[test]
    fn a_cut_inside_a_multibyte_character_is_a_torn_line_not_an_error() {
        let dir = Dir::new("utf8");
        let whole = line(&record(1, "数据"));
        let next = line(&record(2, "数据"));
        // The first byte of '数' (three bytes in UTF-8), and nothing after it.
        let at = next.windows(3).position(|w| w == "数".as_bytes()).unwrap() + 1;
        std::fs::write(dir.spool(), [whole.as_slice(), &next[..at]].concat()).unwrap();

        let mut spool = Spool::open(&dir.spool()).unwrap();
        assert_eq!(spool.depth(), 1);
        spool.push(record(3, "café"));
        spool.flush().unwrap();
        let (records, bytes) = spool.snapshot().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].record.comm, "数据");
        assert_eq!(records[1].record.comm, "café");
        assert_eq!(bytes, std::fs::metadata(dir.spool()).unwrap().len());
    }

    #[test]
    fn a_bad_line_in_the_middle_goes_to_the_side_file_and_glued_records_are_recovered() {
        let dir = Dir::new("middle");
        let bad = b"{\"event_uid\":\"x\", not json at all\n".to_vec();
        // What the old spool made of a torn tail: the next record glued onto it.
        let glued = [&line(&record(3, "sleep"))[..30], &line(&record(4, "sleep"))].concat();
        let content = [
            line(&record(1, "sleep")),
            bad.clone(),
            line(&record(2, "sleep")),
            b"\n".to_vec(),
            glued,
            line(&record(5, "sleep")),
        ]
        .concat();
        std::fs::write(dir.spool(), content).unwrap();

        let mut spool = Spool::open(&dir.spool()).unwrap();
        assert_eq!(pids(&mut spool), vec![1, 2, 4, 5]);
        let side = std::fs::read(spool.corrupt_path()).unwrap();
        let side: Vec<&[u8]> = side
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(side.len(), 2, "the bad line and the torn fragment");
        assert_eq!([side[0], b"\n"].concat(), bad);
        assert_eq!(side[1], &line(&record(3, "sleep"))[..30]);
        // The spool itself is whole again: opening it once more changes nothing.
        let before = std::fs::read(dir.spool()).unwrap();
        let again = Spool::open(&dir.spool()).unwrap();
        assert_eq!(again.depth(), 4);
        assert_eq!(std::fs::read(dir.spool()).unwrap(), before);
    }

    #[test]
    fn a_last_record_lacking_only_its_line_end_is_kept() {
        let dir = Dir::new("unterminated");
        let mut content = line(&record(1, "sleep"));
        content.extend_from_slice(&line(&record(2, "sleep")));
        content.pop();
        std::fs::write(dir.spool(), &content).unwrap();
        let mut spool = Spool::open(&dir.spool()).unwrap();
        spool.push(record(3, "sleep"));
        spool.flush().unwrap();
        assert_eq!(pids(&mut spool), vec![1, 2, 3]);
    }

    #[test]
    fn a_failed_append_leaves_no_partial_line_and_its_records_are_held_then_written() {
        let dir = Dir::new("enospc");
        let mut spool = Spool::open(&dir.spool()).unwrap();
        spool.push(record(1, "sleep"));
        spool.flush().unwrap();
        let before = std::fs::read(dir.spool()).unwrap();

        spool.push(record(2, "sleep"));
        spool.push(record(3, "sleep"));
        spool.fail_after = Some(70);
        let err = spool.flush().unwrap_err();
        assert!(format!("{err:#}").contains("No space left"), "{err:#}");
        assert_eq!(std::fs::read(dir.spool()).unwrap(), before, "cut back");
        assert_eq!((spool.depth(), spool.held()), (1, 2));
        assert!(spool.error().is_some());

        spool.push(record(4, "sleep"));
        assert_eq!(
            spool.flush().unwrap(),
            3,
            "held ones first, then the new one"
        );
        assert_eq!((spool.depth(), spool.held(), spool.error()), (4, 0, None));
        assert_eq!(pids(&mut spool), vec![1, 2, 3, 4]);
        // Two flushes that wrote, one fsync each; the failed one's fsync never came.
        assert_eq!((spool.appended(), spool.syncs()), (4, 2));
    }

    #[test]
    fn many_records_pushed_together_cost_one_write_and_one_fsync() {
        let dir = Dir::new("group");
        let mut spool = Spool::open(&dir.spool()).unwrap();
        for n in 0..1000 {
            spool.push(record(n, "sleep"));
        }
        assert_eq!(spool.flush().unwrap(), 1000);
        assert_eq!(spool.syncs(), 1);
        assert_eq!(Spool::open(&dir.spool()).unwrap().depth(), 1000);
    }

    #[test]
    fn consume_keeps_what_was_appended_after_the_snapshot() {
        let dir = Dir::new("consume");
        let mut spool = Spool::open(&dir.spool()).unwrap();
        spool.push(record(1, "sleep"));
        spool.push(record(2, "sleep"));
        spool.flush().unwrap();
        let (records, bytes) = spool.snapshot().unwrap();
        spool.push(record(3, "sleep"));
        spool.flush().unwrap();
        spool.consume(bytes, records.len()).unwrap();
        assert_eq!(spool.depth(), 1);
        assert_eq!(pids(&mut spool), vec![3]);
        spool.push(record(4, "sleep"));
        spool.flush().unwrap();
        assert_eq!(pids(&mut spool), vec![3, 4]);
    }

    #[test]
    fn records_waiting_are_those_in_the_file_then_those_held() {
        let dir = Dir::new("waiting");
        let mut spool = Spool::open(&dir.spool()).unwrap();
        spool.push(record(1, "sleep"));
        spool.flush().unwrap();
        spool.push(record(2, "sleep"));
        let waiting: Vec<u32> = spool
            .waiting()
            .unwrap()
            .iter()
            .map(|r| r.record.pid)
            .collect();
        assert_eq!(waiting, [1, 2], "in the file, then held");
    }
}
