//! What the daemon keeps is root's alone, whoever starts it and however: the state
//! directory (database, spool, HTTP token) is mode 0700, and every file the daemon
//! creates is 0600 (its umask is 077; the control socket is given its own mode).

use std::{
    io::{Read as _, Write as _},
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result, bail};

/// Random bytes in a new HTTP token (written as hex).
const TOKEN_BYTES: usize = 32;
/// The shortest token accepted from an existing token file.
const TOKEN_MIN_CHARS: usize = 32;

/// From now on every file and directory the daemon creates is its owner's alone.
pub fn restrict_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Makes `dir` (created if missing) the daemon's own: mode 0700. One open to others is
/// tightened, and the line saying so is returned; one writable by everyone (a shared
/// directory such as /tmp) or owned by another user is refused.
pub fn own_dir(dir: &Path) -> Result<Option<String>> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(err) => bail!("cannot create the state directory {}: {err}", dir.display()),
    }
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("reading the state directory {}", dir.display()))?;
    let mode = meta.mode() & 0o7777;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        bail!(
            "the state directory {} belongs to uid {}, not to uid {me} that runs the daemon: \
             pass a --state-dir of its own",
            dir.display(),
            meta.uid()
        );
    }
    if mode & 0o002 != 0 {
        bail!(
            "the state directory {} is writable by every user (mode {mode:04o}): pass a \
             --state-dir of its own, such as /var/lib/watchdog",
            dir.display()
        );
    }
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making the state directory {} mode 0700", dir.display()))?;
    Ok(Some(format!(
        "the state directory {} was mode {mode:04o}: made 0700, so that only root reads the \
         database, the spool and the HTTP token",
        dir.display()
    )))
}

/// Makes an existing file the daemon keeps (a database given outside the state
/// directory) mode 0600; the line saying so when it was open to others.
pub fn own_file(path: &Path) -> Result<Option<String>> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(None);
    };
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} mode 0600", path.display()))?;
    Ok(Some(format!(
        "{} was mode {mode:04o}: made 0600, so that only root reads it",
        path.display()
    )))
}

/// The bearer token the HTTP listener asks for: read from `path`, or made (random,
/// mode 0600) when the file does not exist, so a restart keeps it and deleting the
/// file makes a new one.
pub fn http_token(path: &Path) -> Result<String> {
    match std::fs::File::open(path) {
        Ok(file) => {
            let mut text = String::new();
            file.take(4096)
                .read_to_string(&mut text)
                .with_context(|| format!("reading the HTTP token {}", path.display()))?;
            let token = text.trim();
            let wellformed =
                token.len() >= TOKEN_MIN_CHARS && token.bytes().all(|b| b.is_ascii_graphic());
            if !wellformed {
                bail!(
                    "the HTTP token file {} does not hold a token of at least {TOKEN_MIN_CHARS} \
                     printable characters: delete it, and the daemon makes a new one",
                    path.display()
                );
            }
            Ok(token.to_string())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => new_token(path),
        Err(err) => bail!("cannot read the HTTP token {}: {err}", path.display()),
    }
}

fn new_token(path: &Path) -> Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("reading /dev/urandom for the HTTP token")?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the HTTP token {}", path.display()))?;
    writeln!(file, "{token}")
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing the HTTP token {}", path.display()))?;
    Ok(token)
}

/// Whether `presented` is `secret`, in a time that does not tell how much of it matched.
pub fn same_secret(presented: &[u8], secret: &[u8]) -> bool {
    let differing = presented
        .iter()
        .zip(secret)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    presented.len() == secret.len() && differing == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("watchdog-private-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_state_directory_is_made_0700_tightened_when_open_and_refused_when_shared() {
        let dir = scratch("dir");
        assert_eq!(own_dir(&dir).unwrap(), None);
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let said = own_dir(&dir).unwrap().expect("said");
        assert!(said.contains("was mode 0755: made 0700"), "{said}");
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = own_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("writable by every user"), "{err}");
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o7777,
            0o1777,
            "left as it was"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_token_is_made_once_kept_across_reads_and_a_malformed_one_refused() {
        let dir = scratch("token");
        own_dir(&dir).unwrap();
        let path = dir.join("http-token");
        let token = http_token(&path).unwrap();
        assert_eq!(token.len(), 2 * TOKEN_BYTES);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(http_token(&path).unwrap(), token, "kept");
        std::fs::write(&path, "short\n").unwrap();
        let err = http_token(&path).unwrap_err().to_string();
        assert!(err.contains("delete it"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_match_only_whole() {
        assert!(same_secret(b"abcdef", b"abcdef"));
        assert!(!same_secret(b"abcdeg", b"abcdef"));
        assert!(!same_secret(b"abc", b"abcdef"));
        assert!(!same_secret(b"", b"abcdef"));
    }
}
