//! Sees a child process's `syncfs` and `sync` calls, which a FUSE filesystem cannot: Linux sends
//! `FUSE_SYNCFS` only to virtiofs and fuseblk servers (`fc->sync_fs`), so on a plain /dev/fuse mount
//! `syncfs` returns without the filesystem hearing of it (the kernel only writes back its own dirty
//! pages, and this filesystem has none: FUSE writes go through).
//!
//! The child installs a seccomp filter before it executes (Linux 5.5+ for the "continue" answer)
//! that stops each such call and hands it to this process, over a seccomp listener it sends back on
//! a socket. Here a thread reads the call; if it is `sync`, or a `syncfs` of a file under the watched
//! mount (read from `/proc/PID/fd/FD`), it runs the callback (which makes the test filesystem
//! durable), and only then lets the call go on in the child. So a `syncfs` returns to the program
//! after, never before, everything it covers is durable, as on a disk.
#![allow(dead_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

const fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

const fn jump_if(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, jt, jf, k }
}

/// The filter: `syncfs` and `sync` go to the listener, everything else runs. Offsets are those of
/// `struct seccomp_data` (nr at 0, arch at 4).
const FILTER: [libc::sock_filter; 8] = [
    stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 4),
    jump_if(AUDIT_ARCH, 1, 0),
    stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
    jump_if(libc::SYS_syncfs as u32, 2, 0),
    jump_if(libc::SYS_sync as u32, 1, 0),
    stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_USER_NOTIF),
];

/// Watches the `syncfs` calls of the children it [prepares](SyncfsWatch::prepare); stops on drop.
pub struct SyncfsWatch {
    /// The children send their listener on this end (it is open in the child before exec).
    child_end: UnixStream,
    receiver: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    seen: Arc<AtomicU64>,
}

impl SyncfsWatch {
    /// Runs `on_sync` for every `sync`, and every `syncfs` of a file under `mount`.
    pub fn start(mount: &Path, on_sync: impl Fn() + Send + Sync + 'static) -> SyncfsWatch {
        let (parent_end, child_end) = UnixStream::pair().expect("socket pair for the syncfs watch");
        let mount = mount.canonicalize().expect("canonical mount path");
        let on_sync: Arc<dyn Fn() + Send + Sync> = Arc::new(on_sync);
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let (thread_stop, thread_seen) = (Arc::clone(&stop), Arc::clone(&seen));
        let receiver = std::thread::spawn(move || {
            let mut servers = Vec::new();
            while let Some(listener) = recv_fd(&parent_end) {
                let (mount, on_sync, stop, seen) =
                    (mount.clone(), Arc::clone(&on_sync), Arc::clone(&thread_stop), Arc::clone(&thread_seen));
                servers.push(std::thread::spawn(move || serve(&listener, &mount, &*on_sync, &stop, &seen)));
            }
            for server in servers {
                let _ = server.join();
            }
        });
        SyncfsWatch { child_end, receiver: Some(receiver), stop, seen }
    }

    /// Makes `command`'s child install the filter and send its listener here before it executes.
    pub fn prepare(&self, command: &mut Command) {
        let socket = self.child_end.as_raw_fd();
        let filter = FILTER;
        // SAFETY: the closure runs in the forked child before exec and makes only
        // async-signal-safe system calls (prctl, seccomp, sendmsg, close), allocating nothing.
        unsafe {
            command.pre_exec(move || install(socket, &filter));
        }
    }

    /// How many calls ran the callback so far.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }
}

impl Drop for SyncfsWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.child_end.shutdown(std::net::Shutdown::Both);
        if let Some(receiver) = self.receiver.take() {
            let _ = receiver.join();
        }
    }
}

/// In the child: no new privileges, the filter with a listener, the listener sent to the parent.
fn install(socket: RawFd, filter: &[libc::sock_filter; 8]) -> io::Result<()> {
    // SAFETY: plain system calls on memory owned by this frame.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        let program = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
        let listener = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &program as *const libc::sock_fprog,
        );
        if listener < 0 {
            return Err(io::Error::last_os_error());
        }
        let sent = send_fd(socket, listener as RawFd);
        libc::close(listener as RawFd);
        sent
    }
}

/// Room for one control message carrying one descriptor, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct FdSpace([u8; 32]);

fn send_fd(socket: RawFd, fd: RawFd) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut space = FdSpace([0; 32]);
    // SAFETY: the message points at buffers of this frame that outlive the call; CMSG_SPACE(4) is
    // 24, within the 32 octets of `space`.
    unsafe {
        let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.0.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<RawFd>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        if libc::sendmsg(socket, &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The next listener a child sent, or None once the socket is shut down.
fn recv_fd(socket: &UnixStream) -> Option<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut space = FdSpace([0; 32]);
    // SAFETY: as in send_fd; a descriptor received is owned from here on.
    unsafe {
        let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.0.as_mut_ptr().cast();
        msg.msg_controllen = space.0.len() as _;
        if libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) <= 0 {
            return None;
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return None;
        }
        Some(OwnedFd::from_raw_fd(std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>())))
    }
}

/// Answers one child's stopped calls until it has exited (the listener hangs up) or the watch stops.
fn serve(listener: &OwnedFd, mount: &Path, on_sync: &dyn Fn(), stop: &AtomicBool, seen: &AtomicU64) {
    let fd = listener.as_raw_fd();
    while !stop.load(Ordering::SeqCst) {
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd of this frame.
        let ready = unsafe { libc::poll(&mut poll, 1, 200) };
        if ready == 0 || (ready < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted) {
            continue;
        }
        if ready < 0 || poll.revents & libc::POLLIN == 0 {
            return;
        }
        // SAFETY: the kernel fills a zeroed seccomp_notif of this frame.
        let mut call: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut call) } < 0 {
            continue; // the calling thread died meanwhile
        }
        let nr = libc::c_long::from(call.data.nr);
        let covered = nr == libc::SYS_sync || (nr == libc::SYS_syncfs && under(mount, call.pid, call.data.args[0]));
        if covered {
            on_sync();
            seen.fetch_add(1, Ordering::SeqCst);
        }
        let answer = libc::seccomp_notif_resp {
            id: call.id,
            val: 0,
            error: 0,
            flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        };
        // SAFETY: one seccomp_notif_resp of this frame; a thread gone meanwhile is no error.
        unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &answer) };
    }
}

/// Is the descriptor `fd` of thread `tid` open on a file under `mount`?
fn under(mount: &Path, tid: u32, fd: u64) -> bool {
    std::fs::read_link(format!("/proc/{tid}/fd/{fd}")).is_ok_and(|path: PathBuf| path.starts_with(mount))
}
