//! A model driver for the sans-I/O authentication machines, shared by the fuzz targets and by
//! `tests/props.rs`: it feeds a byte stream in chunks, answers every action the way
//! `proxy::session` / `proxy::upstream` would (accepting or refusing logins, completing TLS at
//! once) and records what happened, checking bounds as it goes.

use std::cell::Cell;
use std::fmt::Debug;

use xoauth2_proxy::protocol::{
    imap, pop3, smtp, ClientAction, ClientSession, Failure, UpAction, UpOutcome, UpstreamMachine,
    Words,
};
use xoauth2_proxy::secret::Secret;

/// How failures are worded in the fuzzed replies (any provider's words would do).
const WORDS: Words = Words {
    provider: "Google",
    mail: "Gmail",
};

// ---------------------------------------------------------------------------------------------
// Allocation meter

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, noting the largest single request made on this thread while a
/// [`largest_allocation`] call is running. Install it with `#[global_allocator]`.
pub struct Meter;

fn note(size: usize) {
    // `try_with`: never panic inside the allocator, even during thread teardown.
    if ARMED.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping touches only
// const-initialised thread-locals without destructors, so it never allocates itself.
unsafe impl std::alloc::GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        note(layout.size());
        std::alloc::System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        note(layout.size());
        std::alloc::System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        note(new);
        std::alloc::System.realloc(ptr, layout, new)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout)
    }
}

/// Run `f` and return the largest single allocation it made on this thread (0 when [`Meter`]
/// is not the global allocator).
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    (r, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// Steering: how a stream is chunked and which way each decision goes

/// Cut `stream` into chunks: `shape`'s low 3 bits pick the largest chunk, the rest seed the
/// sizes. Deterministic, so a failing input replays exactly.
pub fn chunks(stream: &[u8], shape: u8) -> Vec<&[u8]> {
    let max = [1usize, 2, 3, 5, 8, 17, 100, 4096][usize::from(shape & 7)];
    let mut x = (u32::from(shape) << 8) | 0x9e37;
    let mut rest = stream;
    let mut out = Vec::new();
    while !rest.is_empty() {
        // xorshift32
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (1 + x as usize % max).min(rest.len());
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
    }
    out
}

/// Yes/no answers for the k-th decision of a run, the same in every run with the same bits.
pub struct Choices {
    bits: u8,
    k: u32,
}

impl Choices {
    pub fn new(bits: u8) -> Self {
        Choices { bits, k: 0 }
    }
    pub fn choose(&mut self) -> bool {
        let b = (self.bits >> (self.k % 8)) & 1 == 1;
        self.k += 1;
        b
    }
}

/// Two runs' records are the same up to and including the first TLS upgrade. After it they
/// may differ by design: bytes that arrived in the same read as the go-ahead are dropped (they
/// could be a plaintext injection), later reads are kept.
pub fn same_until_tls<E: PartialEq + Debug>(whole: &[E], split: &[E], is_tls: impl Fn(&E) -> bool) {
    let cut = |r: &[E]| r.iter().position(&is_tls).map_or(r.len(), |i| i + 1);
    let (a, b) = (cut(whole), cut(split));
    assert_eq!(
        whole[..a],
        split[..b],
        "a different result for the same bytes split differently"
    );
}

// ---------------------------------------------------------------------------------------------
// Client sessions

/// What the model driver records for a client session.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Action(ClientAction),
    /// The login was accepted: what the session handed over for upstream.
    Pending(Vec<u8>),
    /// Every byte was fed and the session is open; this much is left in its buffer.
    End {
        buffered: usize,
    },
}

impl Event {
    pub fn is_tls(&self) -> bool {
        matches!(self, Event::Action(ClientAction::StartTls))
    }
}

/// A protocol's client session as the model driver sees it.
pub trait Client: ClientSession + Debug + Sized {
    /// Most input the session may hold once it has consumed all it can.
    fn max_buffered(&self) -> usize;
    /// Longest single reply the session may produce.
    fn max_send(&self) -> usize;
    /// Longest user name or password a login may carry.
    fn max_credential(&self) -> usize;
}

/// Input the session holds, from its `Debug` output (the only view of it from outside).
pub fn buffered(session: &impl Debug) -> usize {
    let dump = format!("{session:?}");
    let digits = dump
        .split_once("buffered: ")
        .map(|(_, rest)| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap_or("")
        })
        .unwrap_or("");
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no buffered size in {dump}"))
}

fn take_action<S: Client>(s: &mut S) -> Option<ClientAction> {
    let bound = 2 * s.max_buffered() + 64 * 1024;
    let (a, largest) = largest_allocation(|| s.next_action());
    assert!(largest <= bound, "next_action allocated {largest} bytes");
    a
}

fn check_action<S: Client>(s: &S, a: &ClientAction) {
    match a {
        ClientAction::Send(bytes) => {
            assert!(bytes.len() <= s.max_send(), "a {}-byte reply", bytes.len());
        }
        ClientAction::Login { credentials, .. } => {
            assert!(
                !credentials.username.is_empty(),
                "login without a user name"
            );
            assert!(!credentials.password.is_empty(), "login without a password");
            assert!(credentials.username.len() <= s.max_credential());
            assert!(credentials.password.expose().len() <= s.max_credential());
        }
        ClientAction::StartTls | ClientAction::Close => {}
    }
}

/// Feed `chunks` one at a time, acting on every action as the driver would.
pub fn drive_client<S: Client>(mut s: S, chunks: &[&[u8]], choices: u8) -> Vec<Event> {
    let mut choices = Choices::new(choices);
    let mut events = Vec::new();
    let mut closed = false;
    for (i, chunk) in chunks.iter().enumerate() {
        let before = buffered(&s);
        let ((), largest) = largest_allocation(|| s.feed(chunk));
        assert!(
            largest <= 2 * (before + chunk.len()) + 64,
            "feeding {} bytes allocated {largest}",
            chunk.len()
        );
        if closed {
            assert_eq!(s.next_action(), None, "an action after Close");
            continue;
        }
        while let Some(a) = take_action(&mut s) {
            check_action(&s, &a);
            match &a {
                ClientAction::Close => closed = true,
                ClientAction::StartTls => s.tls_established(),
                ClientAction::Login { .. } => {
                    if choices.choose() {
                        for rest in &chunks[i + 1..] {
                            s.feed(rest);
                        }
                        events.push(Event::Action(a));
                        events.push(Event::Pending(s.into_pending_input()));
                        return events;
                    }
                    s.login_failed(&Failure::BadCredentials, &WORDS);
                }
                ClientAction::Send(_) => {}
            }
            events.push(Event::Action(a));
            if closed {
                assert_eq!(s.next_action(), None, "an action after Close");
                break;
            }
        }
        let held = buffered(&s);
        assert!(
            closed || held <= s.max_buffered(),
            "{held} bytes buffered after consuming what it could: {s:?}"
        );
    }
    // After Close the driver drops the session: what it still holds does not matter (and
    // differs by design: bytes fed after Close are ignored).
    if !closed {
        events.push(Event::End {
            buffered: buffered(&s),
        });
    }
    events
}

/// Run `make()` over `stream` whole and cut by `shape`; check both runs agree.
pub fn check_client<S: Client>(
    make: impl Fn() -> S,
    stream: &[u8],
    shape: u8,
    choices: u8,
) -> Vec<Event> {
    let whole = drive_client(make(), &[stream], choices);
    let split = drive_client(make(), &chunks(stream, shape), choices);
    same_until_tls(&whole, &split, Event::is_tls);
    split
}

/// An IMAP session with the limits it was made with (the session does not show them).
#[derive(Debug)]
pub struct Imap {
    pub session: imap::ClientSession,
    pub limits: imap::Limits,
}

/// Small limits, so short inputs reach every "too big" path.
pub const SMALL_IMAP_LIMITS: imap::Limits = imap::Limits {
    max_line: 64,
    max_literal: 40,
    max_command: 100,
    max_id_command: 160,
};

impl Imap {
    pub fn new(starttls_offered: bool, login_allowed: bool, limits: imap::Limits) -> Self {
        Imap {
            session: imap::ClientSession::new(imap::SessionOptions {
                starttls_offered,
                login_allowed,
                limits,
            }),
            limits,
        }
    }
}

impl ClientSession for Imap {
    fn greeting(&self) -> Vec<u8> {
        self.session.greeting()
    }
    fn feed(&mut self, bytes: &[u8]) {
        self.session.feed(bytes)
    }
    fn next_action(&mut self) -> Option<ClientAction> {
        self.session.next_action()
    }
    fn tls_established(&mut self) {
        self.session.tls_established()
    }
    fn login_failed(&mut self, failure: &Failure, words: &Words) {
        self.session.login_failed(failure, words)
    }
    fn into_pending_input(self) -> Vec<u8> {
        self.session.into_pending_input()
    }
}

impl Client for Imap {
    fn max_buffered(&self) -> usize {
        // Only a line that starts as an ID command may reach `max_id_command`.
        let l = self.limits;
        l.max_line.max(l.max_literal).max(l.max_id_command)
    }
    fn max_send(&self) -> usize {
        self.limits.max_line + 256
    }
    fn max_credential(&self) -> usize {
        // Lossy UTF-8 turns one stray byte into three.
        3 * self.limits.max_command
    }
}

impl Client for smtp::ClientSession {
    fn max_buffered(&self) -> usize {
        smtp::MAX_LINE
    }
    fn max_send(&self) -> usize {
        // Replies may quote the (lossily decoded) command word.
        3 * smtp::MAX_LINE + 512
    }
    fn max_credential(&self) -> usize {
        3 * smtp::MAX_LINE
    }
}

impl Client for pop3::ClientSession {
    fn max_buffered(&self) -> usize {
        pop3::MAX_LINE
    }
    fn max_send(&self) -> usize {
        pop3::MAX_LINE + 512
    }
    fn max_credential(&self) -> usize {
        3 * pop3::MAX_LINE
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream machines

pub const TOKEN: &str = "dXNlcj1hbGljZUBnbWFpbC5jb20BYXV0aD1CZWFyZXIgeWEyOS5hMEFmQl9FWEFNUExFAQE=";
pub const TOKEN2: &str = "dXNlcj1hbGljZUBnbWFpbC5jb20BYXV0aD1CZWFyZXIgeWEyOS5TRUNPTkQBAQ==";

/// What the model driver records for an upstream machine.
#[derive(Debug, PartialEq, Eq)]
pub enum UpEvent {
    Action(UpAction),
    /// The driver called `retry` with a fresh token.
    Retried,
    /// Every byte was fed and the exchange is not over.
    End,
}

impl UpEvent {
    pub fn is_tls(&self) -> bool {
        matches!(self, UpEvent::Action(UpAction::StartTls))
    }
}

/// Bounds an upstream machine must keep whatever the server sends.
#[derive(Debug, Clone, Copy)]
pub struct UpBounds {
    /// Most bytes the machine may buffer (a line or a reply in progress).
    pub buffer: usize,
    /// Longest relay in a successful outcome.
    pub relay: usize,
}

pub const IMAP_UP: UpBounds = UpBounds {
    buffer: 64 * 1024,
    relay: 256 * 1024 + 64 * 1024,
};
pub const SMTP_UP: UpBounds = UpBounds {
    buffer: 64 * 1024,
    relay: 64 * 1024,
};
pub const POP3_UP: UpBounds = UpBounds {
    buffer: 64 * 1024,
    relay: 256 * (64 * 1024 + 1),
};

fn check_up_action(a: &UpAction, bounds: UpBounds, fed: usize) {
    match a {
        UpAction::Send(bytes) => assert!(bytes.expose().len() <= 1024, "{a:?}"),
        UpAction::StartTls => {}
        UpAction::Done(UpOutcome::Success { relay, leftover }) => {
            assert!(relay.len() <= bounds.relay, "a {}-byte relay", relay.len());
            assert!(leftover.len() <= fed);
        }
        UpAction::Done(UpOutcome::Rejected { line, .. }) => {
            // Lossy UTF-8 may triple a byte.
            assert!(
                line.len() <= 3 * bounds.buffer,
                "a {}-byte refusal",
                line.len()
            );
        }
        UpAction::Done(UpOutcome::Failed(why)) => assert!(why.len() <= 300, "{why}"),
    }
}

/// Feed server bytes in `chunks`, acting on every action as `proxy::upstream` would; a
/// refusal is retried with a new token when `choices` says so (at most twice).
pub fn drive_upstream<M: UpstreamMachine>(
    mut m: M,
    chunks: &[&[u8]],
    choices: u8,
    bounds: UpBounds,
) -> Vec<UpEvent> {
    let mut choices = Choices::new(choices);
    let mut events = Vec::new();
    let mut retries = 0;
    let mut fed = 0;
    let mut act = |m: &mut M, events: &mut Vec<UpEvent>, fed: usize, rest: &[&[u8]]| -> bool {
        loop {
            let (a, largest) = largest_allocation(|| m.next_action());
            assert!(
                largest <= 2 * (bounds.buffer + bounds.relay) + 8192,
                "next_action allocated {largest} bytes"
            );
            let Some(mut a) = a else { return false };
            check_up_action(&a, bounds, fed);
            match &mut a {
                UpAction::Send(_) => {}
                UpAction::StartTls => m.tls_established(),
                UpAction::Done(UpOutcome::Success { leftover, .. }) => {
                    // The driver splices now: what is still to come belongs after the leftover.
                    leftover.extend(rest.iter().flat_map(|c| c.iter()));
                    events.push(UpEvent::Action(a));
                    return true;
                }
                UpAction::Done(UpOutcome::Rejected { .. }) if retries < 2 && choices.choose() => {
                    retries += 1;
                    events.push(UpEvent::Action(a));
                    events.push(UpEvent::Retried);
                    m.retry(Secret::new(TOKEN2));
                    continue;
                }
                UpAction::Done(_) => {
                    events.push(UpEvent::Action(a));
                    return true;
                }
            }
            events.push(UpEvent::Action(a));
        }
    };
    // Constructors may queue a first command.
    let mut over = act(&mut m, &mut events, 0, chunks);
    for (i, chunk) in chunks.iter().enumerate() {
        m.feed(chunk);
        fed += chunk.len();
        if over {
            assert_eq!(m.next_action(), None, "an action after Done");
            continue;
        }
        if act(&mut m, &mut events, fed, &chunks[i + 1..]) {
            over = true;
            if matches!(
                events.last(),
                Some(UpEvent::Action(UpAction::Done(UpOutcome::Success { .. })))
            ) {
                return events;
            }
        }
    }
    if !over {
        events.push(UpEvent::End);
    }
    events
}

/// Run `make()` over `stream` whole and cut by `shape`; check both runs agree.
pub fn check_upstream<M: UpstreamMachine>(
    make: impl Fn() -> M,
    stream: &[u8],
    shape: u8,
    choices: u8,
    bounds: UpBounds,
) -> Vec<UpEvent> {
    let whole = drive_upstream(make(), &[stream], choices, bounds);
    let split = drive_upstream(make(), &chunks(stream, shape), choices, bounds);
    same_until_tls(&whole, &split, UpEvent::is_tls);
    split
}
