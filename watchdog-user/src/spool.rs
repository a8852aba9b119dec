//! The write-ahead spool: every kill record is appended here and fsync'd before the
//! database sees it, and removed only once the database has committed it. A database
//! outage, or a daemon restart in the middle of one, loses nothing; replays are
//! idempotent because each record carries a unique id.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::store::StoredRecord;

pub struct Spool {
    path: PathBuf,
    file: File,
    depth: usize,
}

impl Spool {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .with_context(|| format!("opening the spool {}", path.display()))?;
        let mut spool = Self {
            path: path.to_path_buf(),
            file,
            depth: 0,
        };
        spool.depth = spool.snapshot()?.0.len();
        Ok(spool)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records waiting for the database.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Appends one record and makes it durable before returning.
    pub fn append(&mut self, record: &StoredRecord) -> Result<()> {
        let mut line = serde_json::to_string(record).expect("records serialize");
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data().context("fsync of the spool")?;
        self.depth += 1;
        Ok(())
    }

    /// Every spooled record, oldest first, and how many bytes of the file they span.
    /// A torn last line (a crash mid-append) is skipped: its record was never
    /// acknowledged.
    pub fn snapshot(&self) -> Result<(Vec<StoredRecord>, u64)> {
        let text = std::fs::read_to_string(&self.path)?;
        let mut records = Vec::new();
        for line in text.lines() {
            match serde_json::from_str(line) {
                Ok(record) => records.push(record),
                Err(err) => tracing::warn!(
                    "skipping a torn spool line in {}: {err}",
                    self.path.display()
                ),
            }
        }
        Ok((records, text.len() as u64))
    }

    /// Drops the first `bytes` (records now committed), keeping anything appended since.
    pub fn consume(&mut self, bytes: u64, records: usize) -> Result<()> {
        let len = self.file.metadata()?.len();
        if len == bytes {
            self.file.set_len(0)?;
            self.file.sync_data()?;
        } else {
            let rest = std::fs::read(&self.path)?.split_off(bytes as usize);
            let tmp = self.path.with_extension("tmp");
            let mut file = File::create(&tmp)?;
            file.write_all(&rest)?;
            file.sync_data()?;
            std::fs::rename(&tmp, &self.path)?;
            self.file = OpenOptions::new()
                .append(true)
                .read(true)
                .open(&self.path)?;
        }
        self.depth = self.depth.saturating_sub(records);
        Ok(())
    }
}
