//! Read-only memory mappings of a window of a raw image, so the backup hashes and compresses
//! the page cache's own pages instead of copying every byte out of it first.
//!
//! A mapping of a file faults with `SIGBUS` where the file no longer extends (another process
//! truncated the image during the backup). The process must keep serving, so a guard catches
//! that signal for addresses inside a live window: it maps a page of zeros over the faulting
//! page, marks the window, and lets the read go on. The backup then sees
//! [`MappedWindow::shrank`] and fails with an error naming the image, without publishing
//! anything. Faults anywhere else go to the handler that was installed before (Rust's stack
//! overflow report, or the default action).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// How many windows may be mapped at once; more wait for their turn by falling back to reads.
const SLOTS: usize = 256;

struct Slot {
    claimed: AtomicBool,
    /// Start address of the window; 0 while the slot is not guarding one.
    start: AtomicUsize,
    end: AtomicUsize,
    tripped: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // reason: only used to initialise `GUARDED`
const FREE: Slot = Slot {
    claimed: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    tripped: AtomicBool::new(false),
};

static GUARDED: [Slot; SLOTS] = [FREE; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(0);
/// The `SIGBUS` disposition before ours, or `None` when the guard could not be installed (then
/// nothing is ever mapped).
static PREVIOUS: OnceLock<Option<libc::sigaction>> = OnceLock::new();

/// A mapped window `[offset, offset + len)` of a file; unmapped on drop.
pub struct MappedWindow {
    ptr: *mut libc::c_void,
    len: usize,
    slot: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone; moving it between threads is
// sound, and shared references only read.
unsafe impl Send for MappedWindow {}
unsafe impl Sync for MappedWindow {}

impl MappedWindow {
    /// Maps `len` bytes of `file` at `offset` read-only, or `None` when that is not possible
    /// (unaligned offset, no free slot, the guard or `mmap` refused): the caller then reads.
    /// `offset + len` must not pass the end of the file.
    pub fn map(file: &File, offset: u64, len: usize) -> Option<MappedWindow> {
        let page = page_size()?;
        if len == 0 || !offset.is_multiple_of(page as u64) || !guard_installed() {
            return None;
        }
        let slot = claim_slot()?;
        // SAFETY: a new private read-only mapping at an address the kernel chooses; nothing
        // else refers to that range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            GUARDED[slot].claimed.store(false, Ordering::Release);
            return None;
        }
        let s = &GUARDED[slot];
        s.tripped.store(false, Ordering::Relaxed);
        s.end.store(ptr as usize + len, Ordering::Relaxed);
        s.start.store(ptr as usize, Ordering::Release);
        // SAFETY: advice on a range we just mapped; failure only loses the read-ahead.
        unsafe { libc::madvise(ptr, len, libc::MADV_WILLNEED) };
        Some(MappedWindow { ptr, len, slot })
    }

    /// Whether part of the window lay past the end of the file when it was read (the file was
    /// truncated): those bytes read as zeros and must not be trusted.
    pub fn shrank(&self) -> bool {
        GUARDED[self.slot].tripped.load(Ordering::Acquire)
    }
}

impl std::ops::Deref for MappedWindow {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live read-only mapping of `len` bytes; a page the file no longer
        // backs is replaced by zeros by the guard instead of faulting.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for MappedWindow {
    fn drop(&mut self) {
        let s = &GUARDED[self.slot];
        s.start.store(0, Ordering::Release);
        // SAFETY: unmaps exactly the range `map` mapped; no reference to it outlives `self`.
        unsafe { libc::munmap(self.ptr, self.len) };
        s.claimed.store(false, Ordering::Release);
    }
}

fn page_size() -> Option<usize> {
    let cached = PAGE.load(Ordering::Relaxed);
    if cached != 0 {
        return Some(cached);
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page <= 0 {
        return None;
    }
    PAGE.store(page as usize, Ordering::Relaxed);
    Some(page as usize)
}

fn claim_slot() -> Option<usize> {
    (0..SLOTS).find(|&i| {
        GUARDED[i]
            .claimed
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })
}

fn guard_installed() -> bool {
    PREVIOUS
        .get_or_init(|| {
            page_size()?;
            // SAFETY: installs a SA_SIGINFO handler for SIGBUS and reads back the previous
            // disposition; both structures are fully initialised.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigbus as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut action.sa_mask);
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
                    return None;
                }
                Some(previous)
            }
        })
        .is_some()
}

/// The `SIGBUS` handler: only async-signal-safe work (atomics, `mmap`, `sigaction`).
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for slot in &GUARDED {
        let start = slot.start.load(Ordering::Acquire);
        if start != 0 && addr >= start && addr < slot.end.load(Ordering::Relaxed) && page != 0 {
            let at = addr & !(page - 1);
            // SAFETY: replaces one page inside a window we own with zeros; the window stays
            // mapped (and this page with it) until its owner drops it.
            let r = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                slot.tripped.store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not a window of ours: what would have happened without us.
    let Some(Some(previous)) = PREVIOUS.get() else {
        return;
    };
    let handler = previous.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: restores the previous disposition; returning re-runs the faulting access,
        // which then gets it.
        unsafe { libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut()) };
    } else if previous.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed as a SA_SIGINFO handler with this type.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, context);
    } else {
        // SAFETY: the previous handler was installed as a plain handler with this type.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_window_reads_the_file_and_a_truncated_file_reads_as_zeros_marked_shrank() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8 + 1).collect();
        file.write_all(&data).unwrap();
        let win = MappedWindow::map(&file, 64 * 1024, 128 * 1024).unwrap();
        assert_eq!(&win[..], &data[64 * 1024..192 * 1024]);
        assert!(!win.shrank());

        // Another process shrinking the image under a live window.
        file.set_len(96 * 1024).unwrap();
        let win2 = MappedWindow::map(&file, 0, 64 * 1024).unwrap();
        let tail: Vec<u8> = win[40 * 1024..].to_vec();
        assert!(win.shrank(), "reading past the new end is noticed");
        assert!(
            tail.iter().all(|&b| b == 0),
            "and reads as zeros, not a crash"
        );
        assert_eq!(&win[..32 * 1024], &data[64 * 1024..96 * 1024]);
        assert!(!win2.shrank(), "other windows are not marked");
        drop(win);
        drop(win2);
    }

    #[test]
    fn unaligned_or_empty_windows_are_refused() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 8192]).unwrap();
        assert!(MappedWindow::map(&file, 512, 4096).is_none());
        assert!(MappedWindow::map(&file, 0, 0).is_none());
        assert!(MappedWindow::map(&file, 4096, 4096).is_some());
    }
}
