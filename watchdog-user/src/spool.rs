//! The write-ahead spool: every kill record is appended here and fsync'd before the
//! database sees it, and removed only once the database has committed it. A database
//! outage, or a daemon restart in the middle of one, loses nothing; replays are
//! idempotent because each record carries a unique id.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
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
        let mut spool = Self { path: path.to_path_buf(), file, depth: 0 };
        spool.depth = spool.records()?.len();
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

    /// Every spooled record, oldest first. A torn last line (a crash mid-append) is
    /// skipped: its record was never acknowledged.
    pub fn records(&self) -> Result<Vec<StoredRecord>> {
        let reader = BufReader::new(File::open(&self.path)?);
        let mut records = Vec::new();
        for line in reader.lines() {
            match serde_json::from_str(&line?) {
                Ok(record) => records.push(record),
                Err(err) => tracing::warn!("skipping a torn spool line in {}: {err}", self.path.display()),
            }
        }
        Ok(records)
    }

    /// Empties the spool once its records are committed.
    pub fn clear(&mut self) -> Result<()> {
        self.file.set_len(0)?;
        self.file.sync_data()?;
        self.depth = 0;
        Ok(())
    }
}
