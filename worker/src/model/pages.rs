//! Weights on 2 MB pages.
//!
//! A decode step streams every weight it uses once: 366 MB per token for the bf16 bench
//! model at batch 1, 89 000 pages of 4 KB. Each page costs a TLB miss and a page walk, and
//! the CPU's prefetchers stop at page boundaries, so on 4 KB pages the stream restarts every
//! 4 KB. On 2 MB pages (transparent huge pages) the same bytes span 183 pages. On the
//! 2-vCPU EPYC the machine's read bandwidth went from 42 to 60 GB/s, and `switchyard-worker
//! bench` runs with and without, interleaved, decoded 6 to 13 % faster at batch 1 in bf16
//! and f32 (docs/benchmarks.md, the sixth run against llama.cpp).
//!
//! The weights are copied out of the checkpoint into anonymous memory at load, by candle,
//! on 4 KB pages (distributions set THP to `madvise`, and nothing advised it). Once a model
//! is loaded, [`back_weights`] asks the kernel to collapse every fully resident anonymous
//! mapping of the process (the weights, and whatever of the heap is resident) into huge
//! pages with `MADV_COLLAPSE` (Linux 6.1+), which rewrites the pages in place: no memory is
//! added, the contents are unchanged. It is best effort: an older kernel or no free 2 MB
//! blocks leave the pages as they are, and the load goes on. [`advise`] marks a buffer that
//! is not yet touched (the KV cache) so that its pages are huge as they are first written.
//!
//! The collapse runs on a thread of its own at idle priority ([`in_background`]), so a
//! worker is ready as soon as its weights are loaded: it costs the load 0.1 to 2.8 s per GB
//! on the 2-vCPU VM, depending on how much of the VM's free memory the host had to back
//! afresh (a C loop touching 1 GB of fresh 2 MB pages took 0.08 to 2.4 s there, against
//! 0.4 s on 4 KB pages), and decode runs on 4 KB pages until it is done. `switchyard-worker
//! bench` waits for it before measuring.
//!
//! Neither is done when the node has THP set to `never`
//! (`/sys/kernel/mm/transparent_hugepage/enabled`; `MADV_COLLAPSE` would otherwise ignore
//! it), or when [`HUGE_PAGES_ENV`] is `0`.

use std::time::Duration;

/// What [`back_weights`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collapsed {
    /// Bytes now on 2 MB pages.
    pub huge: u64,
    /// Bytes it tried: the 2 MB-aligned parts of fully resident anonymous mappings.
    pub eligible: u64,
    /// Why nothing was collapsed, when nothing was: switched off, or the kernel refused
    /// every range (errno text).
    pub refused: Option<&'static str>,
    /// How long it took.
    pub took: Duration,
}

impl std::fmt::Display for Collapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} MB on 2 MB pages in {} ms",
            self.huge >> 20,
            self.eligible >> 20,
            self.took.as_millis()
        )?;
        if let Some(why) = self.refused {
            write!(f, " ({why})")?;
        }
        Ok(())
    }
}

const HUGE: usize = 2 << 20;

/// An anonymous mapping, from `/proc/self/smaps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    resident: usize,
}

impl Mapping {
    /// The 2 MB-aligned range inside, if any.
    fn aligned(&self) -> Option<(usize, usize)> {
        let (a, b) = (self.start.next_multiple_of(HUGE), self.end / HUGE * HUGE);
        (b > a).then_some((a, b))
    }
}

/// The private, writable, anonymous mappings (unnamed, or the `[heap]`) of an smaps text,
/// with their resident bytes. Thread stacks and file mappings are left out.
fn anonymous(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    let mut current: Option<Mapping> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            out.extend(current.take());
            let perms = fields.next().unwrap_or("");
            let inode = fields.nth(2).unwrap_or("0");
            let name = fields.next();
            if perms == "rw-p" && inode == "0" && name.is_none_or(|n| n == "[heap]") {
                current = Some(Mapping {
                    start,
                    end,
                    resident: 0,
                });
            }
        } else if first == "Rss:"
            && let Some(m) = current.as_mut()
        {
            m.resident = fields
                .next()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0)
                << 10;
        }
    }
    out.extend(current);
    out
}

/// The environment variable that turns the 2 MB pages off (`0`); unset or `1` is on.
pub const HUGE_PAGES_ENV: &str = "SWITCHYARD_HUGE_PAGES";

/// [`HUGE_PAGES_ENV`] as set; anything but `0` or `1` is an error naming it (the worker
/// checks it at start).
pub fn setting() -> Result<bool, String> {
    parse(std::env::var(HUGE_PAGES_ENV).ok().as_deref())
}

fn parse(value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(other) => Err(format!(
            "{HUGE_PAGES_ENV}={other:?}: accepted values are 1 (weights and KV cache on \
             2 MB pages where the kernel allows, the default) and 0 (4 KB pages)"
        )),
    }
}

/// Whether to use 2 MB pages: [`setting`], and the node's THP mode not `never` (read once).
fn wanted() -> Result<(), &'static str> {
    static WANTED: std::sync::OnceLock<Result<(), &'static str>> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| {
        if !setting().unwrap_or(true) {
            return Err("off by SWITCHYARD_HUGE_PAGES=0");
        }
        match std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled") {
            Ok(mode) if mode.contains("[never]") => Err("the node's THP mode is never"),
            _ => Ok(()),
        }
    })
}

/// Collapses this process's fully resident anonymous mappings into 2 MB pages (see the
/// module's notes). Call it once a model's weights are loaded, before the KV cache is
/// allocated (an untouched buffer is not resident, so it is skipped anyway).
pub fn back_weights() -> Collapsed {
    let started = std::time::Instant::now();
    let mut done = Collapsed::default();
    if let Err(why) = wanted() {
        done.refused = Some(why);
        return done;
    }
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        done.refused = Some("no /proc/self/smaps");
        return done;
    };
    let mut refusal = None;
    for m in anonymous(&smaps) {
        // Fully resident only: collapsing a sparse range would fill its holes.
        if m.resident < m.end - m.start {
            continue;
        }
        let Some((a, b)) = m.aligned() else { continue };
        done.eligible += (b - a) as u64;
        match madvise(a, b - a, libc::MADV_HUGEPAGE).and_then(|()| madvise(a, b - a, COLLAPSE)) {
            Ok(()) => done.huge += (b - a) as u64,
            Err(e) => refusal = Some(e),
        }
    }
    if done.huge == 0 {
        done.refused = refusal;
    }
    done.took = started.elapsed();
    done
}

/// A collapse running on its own thread.
#[derive(Debug)]
pub struct Backing(Option<std::thread::JoinHandle<Collapsed>>);

impl Backing {
    /// Waits for the collapse; `None` if its thread could not start or panicked.
    pub fn wait(mut self) -> Option<Collapsed> {
        self.0.take().and_then(|h| h.join().ok())
    }
}

/// [`back_weights`] on a thread at idle priority (`SCHED_IDLE`: it runs when the cores have
/// nothing else to do), logging what it did with `what` (the weights of a model, a shard's
/// experts) when done. Dropping the [`Backing`] lets it finish on its own.
pub fn in_background(what: &'static str) -> Backing {
    let spawned = std::thread::Builder::new()
        .name("huge-pages".into())
        .spawn(move || {
            idle_priority();
            let pages = back_weights();
            tracing::info!(%pages, "{what} moved to 2 MB pages");
            pages
        });
    match spawned {
        Ok(handle) => Backing(Some(handle)),
        Err(error) => {
            tracing::warn!(%error, "{what} stay on 4 KB pages: no thread for the collapse");
            Backing(None)
        }
    }
}

#[cfg(target_os = "linux")]
fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the calling thread's (pid 0) policy from a valid parameter block.
    #[allow(unsafe_code)]
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param)
    };
}

#[cfg(not(target_os = "linux"))]
fn idle_priority() {}

/// [`advise`] on a CPU tensor's storage (of a float type); other tensors are left alone.
pub fn advise_tensor(t: &candle_core::Tensor) {
    use candle_core::{CpuStorage, Storage};
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => advise(v),
        Storage::Cpu(CpuStorage::BF16(v)) => advise(v),
        Storage::Cpu(CpuStorage::F16(v)) => advise(v),
        _ => {}
    }
}

/// Marks `buf` (not yet written) so that the kernel backs it with 2 MB pages as it is first
/// touched. Best effort: a refusal leaves 4 KB pages.
pub fn advise<T>(buf: &[T]) {
    if wanted().is_err() {
        return;
    }
    let m = Mapping {
        start: buf.as_ptr() as usize,
        end: buf.as_ptr() as usize + std::mem::size_of_val(buf),
        resident: 0,
    };
    if let Some((a, b)) = m.aligned() {
        let _ = madvise(a, b - a, libc::MADV_HUGEPAGE);
    }
}

/// `MADV_COLLAPSE` from `<linux/mman.h>` (Linux 6.1+; the libc crate has it for glibc
/// targets only).
const COLLAPSE: libc::c_int = 25;

#[cfg(target_os = "linux")]
fn madvise(addr: usize, len: usize, advice: libc::c_int) -> Result<(), &'static str> {
    // SAFETY: `addr..addr + len` lies inside one of this process's mappings (callers take
    // it from smaps or from a live buffer, aligned inward); neither advice changes what the
    // memory holds, only the size of the pages under it.
    #[allow(unsafe_code)]
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    if r == 0 {
        return Ok(());
    }
    let errno = std::io::Error::last_os_error().raw_os_error();
    Err(match (advice, errno) {
        (COLLAPSE, Some(libc::EINVAL)) => "MADV_COLLAPSE refused (EINVAL): kernel older than 6.1",
        (COLLAPSE, Some(libc::EAGAIN)) => "MADV_COLLAPSE refused (EAGAIN): no free 2 MB blocks",
        (COLLAPSE, Some(libc::ENOMEM)) => "MADV_COLLAPSE refused (ENOMEM): out of memory",
        (COLLAPSE, _) => "MADV_COLLAPSE refused",
        (_, Some(libc::EINVAL)) => "MADV_HUGEPAGE refused (EINVAL): no THP in this kernel",
        (_, Some(libc::EPERM)) => "MADV_HUGEPAGE refused (EPERM): THP disabled for this process",
        _ => "MADV_HUGEPAGE refused",
    })
}

#[cfg(not(target_os = "linux"))]
fn madvise(_: usize, _: usize, _: libc::c_int) -> Result<(), &'static str> {
    Err("not Linux")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0c00000 rw-p 00000000 00:00 0                          [heap]
Size:               2048 kB
Rss:                2048 kB
7f0000000000-7f0000a00000 rw-p 00000000 00:00 0 
Size:              10240 kB
Rss:               10240 kB
AnonHugePages:         0 kB
7f0000a00000-7f0000b00000 rw-p 00000000 08:01 1234                       /data/model.gguf
Size:               1024 kB
Rss:                1024 kB
7f0001000000-7f0001800000 rw-p 00000000 00:00 0 
Size:               8192 kB
Rss:                 512 kB
7ffd00000000-7ffd00200000 rw-p 00000000 00:00 0                          [stack]
Size:               2048 kB
Rss:                  64 kB
7f0002000000-7f0002001000 r--p 00000000 00:00 0 
Size:                  4 kB
Rss:                   4 kB
";

    #[test]
    fn smaps_gives_the_anonymous_writable_mappings_with_their_resident_bytes() {
        let m = anonymous(SMAPS);
        assert_eq!(
            m,
            vec![
                Mapping {
                    start: 0x55d0c0a00000,
                    end: 0x55d0c0c00000,
                    resident: 2048 << 10
                },
                Mapping {
                    start: 0x7f0000000000,
                    end: 0x7f0000a00000,
                    resident: 10240 << 10
                },
                Mapping {
                    start: 0x7f0001000000,
                    end: 0x7f0001800000,
                    resident: 512 << 10
                },
            ]
        );
    }

    #[test]
    fn only_whole_two_megabyte_pages_inside_a_mapping_are_touched() {
        let m = |start, end| Mapping {
            start,
            end,
            resident: 0,
        };
        assert_eq!(m(0x1000, 0x400000).aligned(), Some((0x200000, 0x400000)));
        assert_eq!(m(0x200000, 0x600000).aligned(), Some((0x200000, 0x600000)));
        assert_eq!(m(0x1000, 0x3ff000).aligned(), None);
        assert_eq!(m(0x201000, 0x3ff000).aligned(), None);
    }

    /// A resident buffer of the test's own (8 MB, so its own mapping, though the kernel
    /// may merge it with a neighbour that is not resident) is intact after the collapse.
    #[test]
    fn collapsing_keeps_the_contents() {
        let data: Vec<u64> = (0..(8usize << 20) / 8).map(|i| i as u64 * 31).collect();
        let done = back_weights();
        eprintln!("{done}");
        assert!(done.huge <= done.eligible);
        assert!(data.iter().enumerate().all(|(i, v)| *v == i as u64 * 31));
    }

    #[test]
    fn the_setting_takes_zero_or_one() {
        assert_eq!(parse(None), Ok(true));
        assert_eq!(parse(Some("1")), Ok(true));
        assert_eq!(parse(Some("0")), Ok(false));
        let err = parse(Some("yes")).unwrap_err();
        assert!(
            err.contains("SWITCHYARD_HUGE_PAGES=\"yes\"") && err.contains("accepted values"),
            "{err}"
        );
    }
}
