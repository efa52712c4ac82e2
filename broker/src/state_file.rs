//! Small state files (the catalog, later the producer-id allocator), written atomically and
//! format-versioned.
//!
//! Layout: 8-byte magic, u16 format version (big-endian), u32 payload length, the postcard
//! payload, then a CRC-32C of everything before it. Writes go to a temporary file that is
//! fsynced, renamed over the old file, and followed by an fsync of the directory, so a crash
//! leaves either the old file or the new one, never a mix.
//!
//! References: docs/architecture.md "Storage"; Kafka's checkpoint files follow the same
//! write-temp-then-rename pattern.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a state file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateFileError {
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file exists but is not a valid state file of this kind and version.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

const HEADER_BYTES: usize = 8 + 2 + 4;

/// Reads `path`. `Ok(None)` when it does not exist.
///
/// # Errors
/// [`StateFileError::Corrupt`] when the magic, version, length or checksum is wrong, or the
/// payload does not decode; `Io` when the file cannot be read.
pub(crate) fn read<T: DeserializeOwned>(
    path: &Path,
    magic: &[u8; 8],
    version: u16,
) -> Result<Option<T>, StateFileError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateFileError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let corrupt = |reason: String| StateFileError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < HEADER_BYTES + 4 {
        return Err(corrupt(format!("only {} bytes", bytes.len())));
    }
    if &bytes[..8] != magic {
        return Err(corrupt("wrong magic: not a file of this kind".into()));
    }
    let found_version = u16::from_be_bytes([bytes[8], bytes[9]]);
    if found_version != version {
        return Err(corrupt(format!(
            "format version {found_version}, this build reads version {version}"
        )));
    }
    let length = u32::from_be_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]);
    let length = usize::try_from(length).map_err(|_| corrupt("length overflows".into()))?;
    if bytes.len() != HEADER_BYTES + length + 4 {
        return Err(corrupt(format!(
            "payload length {length} does not match file size {}",
            bytes.len()
        )));
    }
    let (body, trailer) = bytes.split_at(HEADER_BYTES + length);
    let stored = u32::from_be_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        )));
    }
    postcard::from_bytes(&body[HEADER_BYTES..])
        .map(Some)
        .map_err(|e| corrupt(format!("payload does not decode: {e}")))
}

/// Atomically replaces `path` with `value`.
///
/// # Errors
/// `Io` when any step (write, fsync, rename, directory fsync) fails; the old file is then
/// still in place.
pub(crate) fn write<T: Serialize>(
    path: &Path,
    magic: &[u8; 8],
    version: u16,
    value: &T,
) -> Result<(), StateFileError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateFileError::Io { path, source }
    };
    let payload = postcard::to_stdvec(value).map_err(|e| StateFileError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("cannot encode: {e}"),
    })?;
    let length = u32::try_from(payload.len()).map_err(|_| StateFileError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("{} bytes is too large for a state file", payload.len()),
    })?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + payload.len() + 4);
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&version.to_be_bytes());
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes.extend_from_slice(&payload);
    bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_be_bytes());

    // The whole name plus `.tmp`: a producer snapshot and a window snapshot at the same offset
    // (`<offset>.snapshot`, `<offset>.dedup`), written by different threads, must not share
    // a temporary file.
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temporary)
        .map_err(io(&temporary))?;
    file.write_all(&bytes).map_err(io(&temporary))?;
    file.sync_all().map_err(io(&temporary))?;
    drop(file);
    fs::rename(&temporary, path).map_err(io(path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Fsyncs a directory so a rename or a new file in it is durable.
///
/// # Errors
/// `Io` when the directory cannot be opened or synced.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StateFileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StateFileError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// The offsets named by the files `<20-digit offset>.<extension>` in `dir`, unordered (the
/// snapshot files); an unreadable directory has none.
pub(crate) fn offsets_named(dir: &Path, extension: &str) -> Vec<i64> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let suffix = format!(".{extension}");
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let stem = name.to_str()?.strip_suffix(suffix.as_str())?.to_string();
            (stem.len() == 20)
                .then(|| stem.parse::<i64>().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"SEMELTST";

    /// A roll's producer snapshot and its window snapshot have the same offset and different
    /// extensions, and are written by different threads: each must land whole.
    #[test]
    fn files_differing_only_in_extension_are_written_at_once_without_mixing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = |extension: &'static str, fill: u8| {
            let path = dir.path().join(format!("{:020}.{extension}", 7));
            move || {
                for round in 0..200u32 {
                    let value = (round, vec![fill; 64 * 1024]);
                    write(&path, MAGIC, 1, &value)?;
                }
                Ok::<_, StateFileError>(path)
            }
        };
        let (a, b) = std::thread::scope(|scope| {
            let a = scope.spawn(writer("snapshot", 1));
            let b = scope.spawn(writer("dedup", 2));
            (a.join().expect("thread"), b.join().expect("thread"))
        });
        for (path, fill) in [
            (a.expect("snapshot writes"), 1),
            (b.expect("dedup writes"), 2),
        ] {
            let (round, bytes) = read::<(u32, Vec<u8>)>(&path, MAGIC, 1)
                .expect("intact")
                .expect("present");
            assert_eq!(round, 199);
            assert!(bytes.iter().all(|b| *b == fill), "{} mixed", path.display());
        }
    }

    #[test]
    fn round_trip_and_corruption_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.bin");
        assert_eq!(
            read::<Vec<String>>(&path, MAGIC, 1).expect("missing is fine"),
            None
        );
        let value = vec!["a".to_string(), "b".to_string()];
        write(&path, MAGIC, 1, &value).expect("write");
        assert_eq!(
            read::<Vec<String>>(&path, MAGIC, 1).expect("read"),
            Some(value)
        );

        let err = read::<Vec<String>>(&path, MAGIC, 2).unwrap_err();
        assert!(err.to_string().contains("format version 1"), "{err}");

        let mut bytes = fs::read(&path).expect("read raw");
        let last = bytes.len() - 5;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).expect("write raw");
        let err = read::<Vec<String>>(&path, MAGIC, 1).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");

        fs::write(&path, b"short").expect("write raw");
        assert!(matches!(
            read::<Vec<String>>(&path, MAGIC, 1),
            Err(StateFileError::Corrupt { .. })
        ));
    }
}
