//! The encrypted-file backend: one sealed file (`store.enc`) in the state directory. Writers
//! take an exclusive lock on `store.lock`, re-read, change and replace the file atomically (temp
//! file, fsync, rename), so concurrent processes never lose an update and a writer killed midway
//! leaves the old file; readers notice a replaced file by its metadata and reload.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::key::{MasterKey, Unsealed};
use super::{check_private, io_err, write_atomic, Backend, Change, Stamp, StoreData, StoreError};

const MAGIC: &[u8; 8] = b"XO2PST01";
pub(crate) const STORE_FILE: &str = "store.enc";
const LOCK_FILE: &str = "store.lock";

pub struct FileBackend {
    dir: PathBuf,
    file: PathBuf,
    lock: PathBuf,
    key: MasterKey,
}

impl FileBackend {
    pub fn new(dir: &Path, key: MasterKey) -> FileBackend {
        FileBackend {
            dir: dir.to_path_buf(),
            file: dir.join(STORE_FILE),
            lock: dir.join(LOCK_FILE),
            key,
        }
    }

    /// A store file at any path (`store copy`), locked by a file beside it named after it.
    pub fn at(path: &Path, key: MasterKey) -> FileBackend {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut lock = path.as_os_str().to_owned();
        lock.push(".lock");
        FileBackend {
            dir,
            file: path.to_path_buf(),
            lock: lock.into(),
            key,
        }
    }

    fn store_path(&self) -> PathBuf {
        self.file.clone()
    }

    /// Temp files of writers that were killed before their rename. Only the lock holder
    /// writes, so with the lock held every such file is stale.
    fn remove_stale_temp_files(&self) {
        let file_name = self.file.file_name().unwrap_or_default().to_string_lossy();
        let prefix = format!(".{file_name}.");
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn write(&self, data: &StoreData) -> Result<(), StoreError> {
        let plain = Zeroizing::new(
            serde_json::to_vec(data)
                .map_err(|e| StoreError::Other(format!("encoding store: {e}")))?,
        );
        write_atomic(&self.store_path(), &self.key.seal(MAGIC, &plain)?)
    }

    fn decrypt(&self, path: &Path, bytes: &[u8]) -> Result<StoreData, StoreError> {
        let plain = self.key.open(MAGIC, bytes).map_err(|e| match e {
            Unsealed::Format => StoreError::Format {
                path: path.to_path_buf(),
            },
            Unsealed::Decrypt => StoreError::Decrypt {
                path: path.to_path_buf(),
            },
        })?;
        serde_json::from_slice(&plain).map_err(|_| StoreError::Format {
            path: path.to_path_buf(),
        })
    }
}

fn stamp_of(meta: &fs::Metadata) -> Stamp {
    Stamp::new(
        meta.ino(),
        meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        meta.len(),
    )
}

impl Backend for FileBackend {
    fn describe(&self) -> String {
        format!("the encrypted store in {}", self.dir.display())
    }

    fn stamp(&self) -> Result<Option<Stamp>, StoreError> {
        let path = self.store_path();
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(stamp_of(&m))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn load(&self) -> Result<(StoreData, Option<Stamp>), StoreError> {
        let path = self.store_path();
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((StoreData::default(), None))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let meta = file.metadata().map_err(io_err(&path))?;
        check_private(&path, &meta)?;
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes).map_err(io_err(&path))?;
        Ok((self.decrypt(&path, &bytes)?, Some(stamp_of(&meta))))
    }

    fn update(&self, change: Change<'_>) -> Result<(), StoreError> {
        let _lock = lock_file(&self.lock)?;
        self.remove_stale_temp_files();
        let (mut data, _) = self.load()?;
        change(&mut data)?;
        // The lock is released when `_lock` is dropped (also if anything above failed).
        self.write(&data)
    }
}

/// The exclusive lock on the store's folder, held until the returned file is dropped (also
/// when the process dies: it is an flock).
pub(crate) fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    lock_file(&dir.join(LOCK_FILE))
}

fn lock_file(lock_path: &Path) -> Result<File, StoreError> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(lock_path)
        .map_err(io_err(lock_path))?;
    lock.lock().map_err(io_err(lock_path))?;
    Ok(lock)
}
