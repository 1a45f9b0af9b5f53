//! Child processes of the harness, and cleaning up after them whatever happens.
//!
//! ```text
//!   test thread ──Command──> spawner thread (lives as long as the test binary)
//!                               └─ fork: PR_SET_PDEATHSIG=SIGKILL, exec
//!   exit of the test binary ──> atexit: SIGKILL every child, reap it, remove temp dirs
//!   SIGKILL of the test binary ──> the kernel kills the children (death signal);
//!                                  the next run removes the orphaned temp dirs
//! ```
//!
//! Linux ties the death signal to the *thread* that forked, not the process, and every
//! `#[tokio::test]` runs on threads that end with the test. So all children are forked
//! from one thread that never ends.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, Once, OnceLock};

use crate::error::{HarnessError, Result};

type SpawnReply = mpsc::Sender<std::io::Result<Child>>;

static SPAWNER: OnceLock<mpsc::Sender<(Command, SpawnReply)>> = OnceLock::new();

/// What the exit handler must kill and delete.
#[derive(Default)]
struct Registry {
    pids: Vec<i32>,
    /// Run after the processes are killed, before the directories go: for what outlives
    /// a process (the real node's mounts, network devices, iptables chains, cgroups).
    hooks: Vec<(&'static str, fn())>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    hooks: Vec::new(),
    dirs: Vec::new(),
});
static AT_EXIT: Once = Once::new();

fn spawner() -> &'static mpsc::Sender<(Command, SpawnReply)> {
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(Command, SpawnReply)>();
        std::thread::Builder::new()
            .name("harness-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(spawn_with_death_signal(&mut command));
                }
            })
            .expect("the harness could not start its spawner thread");
        tx
    })
}

#[allow(unsafe_code)]
fn spawn_with_death_signal(command: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec. It calls only prctl(2),
    // getppid(2) and _exit(2), which are async-signal-safe, and it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    command.spawn()
}

fn ensure_exit_handler() {
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn()` that touches only process-global state.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::atexit(cleanup_at_exit) };
        assert_eq!(
            rc, 0,
            "atexit failed: the harness could not register its cleanup"
        );
    });
}

extern "C" fn cleanup_at_exit() {
    // try_lock: never block process exit on a thread that died holding the lock.
    let Ok(mut registry) = REGISTRY.try_lock() else {
        return;
    };
    kill_and_reap(&registry.pids);
    registry.pids.clear();
    for (_, hook) in registry.hooks.drain(..) {
        hook();
    }
    for dir in registry.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[allow(unsafe_code)]
fn kill_and_reap(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: plain syscalls on pids this process spawned; errors (already gone) are fine.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    for &pid in pids {
        // SAFETY: as above; reaping our own child, status not needed.
        unsafe {
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
}

/// A temporary directory under `$TMPDIR/switchyard-tests/` that is removed when dropped or,
/// for fixtures that live in statics, when the test binary exits.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/switchyard-tests/<prefix>-<pid>-<n>`, first removing directories that
    /// earlier test binaries left behind when they were killed.
    pub fn new(prefix: &str) -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let root = std::env::temp_dir().join("switchyard-tests");
        std::fs::create_dir_all(&root)
            .map_err(HarnessError::io(format!("creating {}", root.display())))?;
        remove_orphans(&root);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = root.join(format!("{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(HarnessError::io(format!("creating {}", path.display())))?;
        ensure_exit_handler();
        lock_registry().dirs.push(path.clone());
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        lock_registry().dirs.retain(|d| d != &self.path);
    }
}

/// Runs `hook` when the test binary exits, after every child process is killed (once per
/// `name`, however often it is registered).
pub fn at_exit(name: &'static str, hook: fn()) {
    ensure_exit_handler();
    let mut registry = lock_registry();
    if !registry.hooks.iter().any(|(n, _)| *n == name) {
        registry.hooks.push((name, hook));
    }
}

fn lock_registry() -> std::sync::MutexGuard<'static, Registry> {
    // A test that panicked while holding the lock leaves valid data behind.
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes `<root>/<prefix>-<pid>-<n>` directories whose process no longer exists.
fn remove_orphans(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.rsplit('-').nth(1))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !process_exists(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[allow(unsafe_code)]
pub(crate) fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// A running child process whose output goes to a log file. Killed when dropped, and at
/// exit of the test binary if it lives in a static.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Mutex<Child>,
    log: PathBuf,
}

impl ManagedProcess {
    /// Starts `binary args...` with stdout and stderr written to `log`.
    pub fn start(name: &str, binary: &Path, args: &[String], log: PathBuf) -> Result<Self> {
        let mut command = Command::new(binary);
        command.args(args);
        Self::spawn(name, command, log)
    }

    /// Starts `command` (its program, arguments and environment as set by the caller) with
    /// stdout and stderr written to `log`.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Result<Self> {
        let binary = PathBuf::from(command.get_program());
        let out = File::create(&log).map_err(HarnessError::io(format!(
            "creating log file {}",
            log.display()
        )))?;
        let err = out
            .try_clone()
            .map_err(HarnessError::io("duplicating a log file handle"))?;
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        ensure_exit_handler();
        let (reply, result) = mpsc::channel();
        let spawned = spawner()
            .send((command, reply))
            .ok()
            .and_then(|()| result.recv().ok())
            .unwrap_or_else(|| Err(std::io::Error::other("the harness spawner thread is gone")));
        let child = spawned.map_err(HarnessError::io(format!(
            "starting {name} ({})",
            binary.display()
        )))?;
        lock_registry().pids.push(child.id() as i32);
        Ok(Self {
            name: name.to_string(),
            child: Mutex::new(child),
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Fails with the exit status and the end of the log if the process has exited.
    pub fn check_running(&self) -> Result<()> {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(HarnessError::Exited {
                component: self.name.clone(),
                status: status.to_string(),
                log: self.log.clone(),
                log_tail: self.log_tail(15),
            }),
            Err(e) => Err(HarnessError::io(format!("checking on {}", self.name))(e)),
        }
    }

    /// The last `lines` lines of the log (at most the last 64 KiB of it).
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|p| p.into_inner()).id()
    }

    /// Peak resident memory so far (`VmHWM`), in KiB, while the process runs.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Stops the process now (SIGKILL: everything the harness runs is throwaway).
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let pid = child.id() as i32;
        let _ = child.kill();
        let _ = child.wait();
        lock_registry().pids.retain(|p| *p != pid);
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit on its own; returns
    /// its exit status, or `None` if it had to be killed.
    pub fn terminate(&self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let pid = self.pid() as i32;
        // SAFETY: a plain kill(2) on our own child.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            let status = self
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_wait()
                .ok()
                .flatten();
            if let Some(status) = status {
                lock_registry().pids.retain(|p| *p != pid);
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.kill();
        None
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A free TCP port on 127.0.0.1. The port is free when this returns; the caller binds it
/// soon after, and a start-up that loses the race fails with the component's log.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(HarnessError::io("binding a free loopback port"))?;
    let port = listener
        .local_addr()
        .map_err(HarnessError::io("reading a bound port"))?
        .port();
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphaned_dirs_of_dead_processes_are_removed_and_live_ones_kept() {
        let root = std::env::temp_dir().join(format!("switchyard-orphans-{}", std::process::id()));
        let dead = root.join("cp-999999999-0");
        let live = root.join(format!("cp-{}-0", std::process::id()));
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::create_dir_all(&live).unwrap();
        remove_orphans(&root);
        assert!(!dead.exists());
        assert!(live.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_killed_process_is_reaped_and_reported_as_exited() {
        let dir = TempDir::new("proc").unwrap();
        let process = ManagedProcess::start(
            "sleeper",
            Path::new("/bin/sh"),
            &["-c".into(), "echo started; exec sleep 600".into()],
            dir.path().join("sleeper.log"),
        )
        .unwrap();
        process.check_running().unwrap();
        // Kill only once the shell has written to its log.
        for _ in 0..500 {
            if process.log_tail(1).contains("started") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        process.kill();
        let err = process.check_running().unwrap_err().to_string();
        assert!(err.contains("sleeper exited"), "{err}");
        assert!(err.contains("started"), "{err}");
    }
}
