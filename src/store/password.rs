//! Local app passwords: generated here, shown once, stored only as salted Argon2id hashes.
//!
//! A password names the hash it belongs to: its first [`ID_LEN`] characters are also the
//! first characters of that hash's salt. So a check runs Argon2 once whatever the number of
//! passwords an account has, and a wrong password costs the same for every account. Passwords
//! issued before this format (24 characters, 22-character salts) keep working: they are
//! checked against the hashes of that format only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::Rng;
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// No 0/O/1/l/I: people type these passwords into old clients.
const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
/// Random characters of a password (about 140 bits), after its hash id.
const LENGTH: usize = 24;
/// Characters naming the hash (57^4, about 10 million ids; unique per account).
pub const ID_LEN: usize = 4;
/// Salt of a hash that a password names: the id, then random characters. Its length tells it
/// apart from the 22 characters `SaltString::generate` gives the older format.
const NAMED_SALT_LEN: usize = 24;
/// Memory of the largest hash a worker agrees to check (the default is 19 MiB).
const MAX_BLOCKS: usize = 64 * 1024;

fn random_chars(n: usize) -> String {
    let mut rng = rand::rngs::OsRng;
    (0..n)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A fresh password and its Argon2id PHC string; the password starts with the hash's id.
pub fn generate() -> Result<(Secret, String), String> {
    let id = random_chars(ID_LEN);
    let salt = format!("{id}{}", random_chars(NAMED_SALT_LEN - ID_LEN));
    let password = Secret::new(format!("{id}{}", random_chars(LENGTH)));
    let salt = SaltString::from_b64(&salt).map_err(|e| format!("hashing password: {e}"))?;
    let hash = Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing password: {e}"))?;
    Ok((password, hash))
}

/// An Argon2id PHC string of a password chosen by a person (`admin-password`).
pub fn hash(password: &Secret) -> Result<String, String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing password: {e}"))
}

/// The id of the hash a password names, if it has the current format.
fn password_id(password: &str) -> Option<&str> {
    let named =
        password.len() == ID_LEN + LENGTH && password.bytes().all(|b| ALPHABET.contains(&b));
    named.then(|| &password[..ID_LEN])
}

/// The id a stored hash is named by; `None` for a hash of the older format.
pub fn hash_id(phc: &str) -> Option<String> {
    let parsed = PasswordHash::new(phc).ok()?;
    let salt = parsed.salt?.as_str();
    (salt.len() == NAMED_SALT_LEN).then(|| salt[..ID_LEN].to_string())
}

/// The stored hashes `password` may match: the one it names, or for any other password the
/// hashes of the older format. Empty when none fits (then a decoy is checked instead).
pub fn candidates<'a>(password: &str, hashes: &'a [String]) -> Vec<&'a String> {
    match password_id(password) {
        Some(id) => hashes
            .iter()
            .find(|h| hash_id(h).as_deref() == Some(id))
            .into_iter()
            .collect(),
        None => hashes.iter().filter(|h| hash_id(h).is_none()).collect(),
    }
}

/// Check `password` against a PHC string, with `memory` as Argon2's working memory. False on
/// any malformed or oversized hash.
fn verify_with(memory: &mut WorkMemory, password: &[u8], phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let (Ok(params), Ok(algorithm)) = (
        Params::try_from(&parsed),
        Algorithm::try_from(parsed.algorithm),
    ) else {
        return false;
    };
    let Ok(version) = parsed
        .version
        .map_or(Ok(Version::default()), Version::try_from)
    else {
        return false;
    };
    let Some(blocks) = memory.blocks(params.block_count()) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let mut out = [0u8; 64];
    let Some(out) = out.get_mut(..expected.len()) else {
        return false;
    };
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password, salt, &mut *out, blocks)
        .is_ok()
        && bool::from(out.ct_eq(expected.as_bytes()))
}

struct Job {
    password: Secret,
    phc: String,
    reply: tokio::sync::oneshot::Sender<bool>,
}

/// A fixed set of Argon2 worker threads, each reusing one working memory: memory stays flat
/// however many checks arrive (a blocking-pool thread per check would allocate 19 MiB each
/// time, and glibc keeps every such thread's arena). Checks queue for a free worker.
pub struct Checker {
    jobs: mpsc::Sender<Job>,
    runs: AtomicU64,
}

impl Checker {
    /// One worker per core, at least two; at most three, so that a storm of wrong passwords
    /// costs a bounded amount of memory (19 MiB a worker) on any host.
    pub fn new() -> Checker {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 3));
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || work(&rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password check worker");
            }
        }
        Checker {
            jobs: tx,
            runs: AtomicU64::new(0),
        }
    }

    /// Whether `password` matches `phc`, checked on a worker.
    pub async fn verify(&self, password: &Secret, phc: &str) -> Result<bool, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            password: password.clone(),
            phc: phc.to_string(),
            reply,
        };
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.jobs
            .send(job)
            .map_err(|_| "password check workers are gone".to_string())?;
        answer
            .await
            .map_err(|_| "password check worker failed".to_string())
    }

    /// Argon2 runs so far.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }
}

impl Default for Checker {
    fn default() -> Self {
        Checker::new()
    }
}

/// A worker: take the next job, answer it, until the checker is dropped. When no job waits,
/// its memory's pages go back to the system before it sleeps.
fn work(jobs: &Mutex<mpsc::Receiver<Job>>) {
    let mut memory = WorkMemory::default();
    loop {
        // A worker holding the queue's lock is waiting for work: the queue is empty then.
        let next = match jobs.try_lock() {
            Ok(queue) => queue.try_recv(),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().try_recv(),
            Err(std::sync::TryLockError::WouldBlock) => Err(mpsc::TryRecvError::Empty),
        };
        let job = match next {
            Ok(job) => job,
            Err(mpsc::TryRecvError::Disconnected) => return,
            Err(mpsc::TryRecvError::Empty) => {
                memory.release();
                match jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            }
        };
        let ok = verify_with(&mut memory, job.password.expose().as_bytes(), &job.phc);
        let _ = job.reply.send(ok);
    }
}

/// One worker's Argon2 memory: a private anonymous mapping, so its pages can be handed back
/// to the system while idle (memory from the allocator would stay in the process) and are
/// faulted in again, zeroed, on the next use.
#[derive(Default)]
struct WorkMemory {
    map: Option<(std::ptr::NonNull<Block>, usize)>,
}

// SAFETY: the mapping is owned by this value alone and only reached through `&mut self`.
unsafe impl Send for WorkMemory {}

impl WorkMemory {
    /// `n` blocks of working memory, mapped on first use (or when a hash needs more).
    fn blocks(&mut self, n: usize) -> Option<&mut [Block]> {
        if n > MAX_BLOCKS {
            return None;
        }
        if self.map.is_some_and(|(_, len)| len < n) {
            self.unmap();
        }
        if self.map.is_none() {
            // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    n * std::mem::size_of::<Block>(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return None;
            }
            self.map = Some((std::ptr::NonNull::new(ptr.cast())?, n));
        }
        let (ptr, _) = self.map?;
        // SAFETY: the mapping holds at least `n` page-aligned blocks; zeroed pages are valid
        // blocks (plain integers); `&mut self` makes this the only reference.
        Some(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), n) })
    }

    /// Give the pages back; the mapping stays for the next job.
    fn release(&mut self) {
        if let Some((ptr, len)) = self.map {
            // SAFETY: exactly the mapping made in `blocks`; no slice of it outlives a job.
            unsafe {
                libc::madvise(
                    ptr.as_ptr().cast(),
                    len * std::mem::size_of::<Block>(),
                    libc::MADV_DONTNEED,
                )
            };
        }
    }

    fn unmap(&mut self) {
        if let Some((ptr, len)) = self.map.take() {
            // SAFETY: exactly the mapping made in `blocks`; no slice of it outlives a job.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len * std::mem::size_of::<Block>()) };
        }
    }
}

impl Drop for WorkMemory {
    fn drop(&mut self) {
        self.unmap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(password: &str, phc: &str) -> bool {
        verify_with(&mut WorkMemory::default(), password.as_bytes(), phc)
    }

    #[test]
    fn generated_password_verifies_against_its_hash_only() {
        let (p, h) = generate().unwrap();
        assert_eq!(p.expose().len(), ID_LEN + LENGTH);
        assert!(h.starts_with("$argon2id$"));
        assert!(!h.contains(p.expose()));
        assert!(verify(p.expose(), &h));
        assert!(!verify("wrong", &h));
        assert!(!verify(p.expose(), "garbage"));
        assert_ne!(generate().unwrap().0.expose(), p.expose());
    }

    #[test]
    fn a_password_names_its_hash_and_older_passwords_still_verify() {
        let (p, h) = generate().unwrap();
        let (_, other) = generate().unwrap();
        // The older format: 24 random characters, a random 22-character salt.
        let old = Secret::new(random_chars(LENGTH));
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let old_hash = Argon2::default()
            .hash_password(old.expose().as_bytes(), &salt)
            .unwrap()
            .to_string();
        assert!(verify(old.expose(), &old_hash));
        assert_eq!(hash_id(&old_hash), None);
        assert_eq!(hash_id(&h).as_deref(), Some(&p.expose()[..ID_LEN]));
        let all = vec![other.clone(), old_hash.clone(), h.clone()];
        assert_eq!(candidates(p.expose(), &all), vec![&h]);
        assert_eq!(candidates(old.expose(), &all), vec![&old_hash]);
        assert_eq!(candidates("wrong", &all), vec![&old_hash]);
        assert!(candidates(p.expose(), &[other]).is_empty());
    }

    #[tokio::test]
    async fn workers_check_many_passwords_with_the_memory_they_already_hold() {
        let checker = Checker::new();
        let (p, h) = generate().unwrap();
        for _ in 0..3 {
            assert_eq!(checker.verify(&p, &h).await, Ok(true));
            assert_eq!(checker.verify(&Secret::new("wrong"), &h).await, Ok(false));
        }
        assert_eq!(
            checker
                .verify(
                    &p,
                    "$argon2id$v=19$m=9999999,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaA"
                )
                .await,
            Ok(false)
        );
        assert_eq!(checker.runs(), 7);
    }
}
